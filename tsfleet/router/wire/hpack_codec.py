"""HPACK (RFC 7541) for the gRPC router: a full decoder, and an encoder that never indexes.

The router re-encodes every header block it forwards. Writing each field as a literal that
is never added to the peer's table keeps no encoder state at all (nothing to keep in step
with a connection) and costs a few bytes per field on loopback. Decoding must follow the
peer's dynamic table; the static table and the Huffman code come from the ``hpack`` package.
"""
from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
STATIC = HeaderTable.STATIC_TABLE  # 61 (name, value) pairs, index 1..61
ENTRY_OVERHEAD = 32  # RFC 7541 4.1


class HpackError(ValueError):
    """A header block that cannot be decoded (a COMPRESSION_ERROR for the connection)."""


class HeaderListTooLarge(HpackError):
    """A header list past the agreed SETTINGS_MAX_HEADER_LIST_SIZE, found while decoding it:
    a 23 KiB block of indexed fields once decoded to 74.5 MiB."""


class TooLarge(list):
    """What a decoder made with ``whole=True`` returns for a header list past its limit: no
    header of it (none past the limit was kept), the block decoded to its end all the same, so
    the dynamic table is the peer's and the connection can go on; the stream is refused
    (RFC 9113 10.5.1, a 431's kind of answer)."""


TOO_LARGE = TooLarge()


class NeverIndexed(bytes):
    """A field value its sender marked never indexed (RFC 7541 6.2.3): an intermediary must
    pass it on so, whatever its name. Equal to, and hashed as, the plain bytes."""

    __slots__ = ()


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise HpackError("integer past the end of the header block")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError("string past the end of the header block")
    raw = data[pos:end]
    if not huffman:
        return raw, end
    try:
        return decode_huffman(raw), end
    except HPACKDecodingError as exc:
        raise HpackError(f"bad Huffman string: {exc}") from None


class Decoder:
    """One connection's decoding context (its dynamic table).

    A peer sends much the same header block with every call, and once its fields are in the
    table the bytes repeat too. Decoding depends only on the bytes and the table, so a block
    that changed nothing in the table is remembered, with the table's generation, and the
    same bytes are not decoded again until the table changes (~a third of the gRPC router's
    HPACK work).
    """

    remembered = 256  # blocks, per connection

    def __init__(self, max_size: int = 4096, max_list: int = 64 * 1024, whole: bool = False):
        self.max_size = self.limit = max_size
        self.max_list = max_list  # decoded size of one header list (RFC 9113 6.5.2), 32 bytes a field more
        # Past max_list: False, HeaderListTooLarge (a connection error); True, the block is
        # decoded to its end keeping no more fields, and TOO_LARGE returned (a stream error).
        self.whole = whole
        self.table: deque[Header] = deque()
        self.size = 0
        self.generation = 0  # changes whenever the table does
        self._seen: dict[bytes, tuple[int, list[Header]]] = {}

    def _entry(self, index: int) -> Header:
        if 0 < index <= len(STATIC):
            return STATIC[index - 1]
        if index <= 0:  # RFC 7541 6.1; a deque would read index 0 as an entry from its end
            raise HpackError("header index 0 is not a field")
        try:
            return self.table[index - len(STATIC) - 1]
        except IndexError:
            raise HpackError(f"header index {index} is not in the table") from None

    def _add(self, header: Header) -> None:
        self.generation += 1
        self.table.appendleft(header)
        self.size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD

    def decode(self, block: bytes) -> list[Header]:
        """The block's header list. The same bytes, the table unchanged, give the same list
        object: a caller may remember what it made of a list by the list's identity, and
        must not change it."""
        seen = self._seen.get(block)
        if seen is not None and seen[0] == self.generation:
            return seen[1]
        generation = self.generation
        headers = self._decode(block)
        if headers is TOO_LARGE:
            return headers
        # The same bytes decode the same way until the table changes. Only short blocks are kept
        # (a call's, once indexed, is tens of bytes): 256 large ones held 80 MiB per connection.
        if self.generation == generation and len(block) <= 1024:
            if len(self._seen) >= self.remembered:
                self._seen.clear()
            self._seen[block] = (generation, headers)
        return headers

    def _decode(self, block: bytes) -> list[Header]:
        headers: list[Header] = []
        pos, end, budget = 0, len(block), self.max_list
        try:
            while pos < end:
                byte = block[pos]
                if byte & 0x80:  # indexed field
                    index, pos = _integer(block, pos, 7)
                    header = self._entry(index)
                    budget -= len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
                    if budget < 0:
                        headers = self._over(headers)
                        continue
                    headers.append(header)
                    continue
                if byte & 0xE0 == 0x20:  # dynamic table size update
                    size, pos = _integer(block, pos, 5)
                    if size > self.limit:
                        raise HpackError(f"table size {size} over the agreed {self.limit}")
                    self.max_size = size
                    self.generation += 1
                    self._evict()
                    continue
                indexing, never = byte & 0xC0 == 0x40, byte & 0xF0 == 0x10
                index, pos = _integer(block, pos, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = _string(block, pos)
                value, pos = _string(block, pos)
                if never:
                    value = NeverIndexed(value)
                budget -= len(name) + len(value) + ENTRY_OVERHEAD
                if budget < 0:
                    headers = self._over(headers)
                else:
                    headers.append((name, value))
                if indexing:
                    self._add((name, value))
        except IndexError:
            raise HpackError("truncated header block") from None
        return headers

    def _over(self, headers: list[Header]) -> list[Header]:
        """The list is past max_list: raise, or (``whole``) go on with TOO_LARGE, which keeps
        nothing (appending to it is never done: every later field is past the budget too)."""
        if not self.whole:
            raise HeaderListTooLarge(f"header list over {self.max_list} bytes")
        return TOO_LARGE


def _encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The same few fields come back every call, so their encoding is kept, process-wide: only for
# these names (a value of any other name, a client's key above all, is never kept in memory
# beyond its call), and only short values.
_CACHED_NAMES = frozenset({b":method", b":scheme", b":path", b":authority", b":status", b"content-type", b"te",
                           b"user-agent", b"grpc-accept-encoding", b"grpc-encoding", b"accept-encoding",
                           b"grpc-status", b"x-model-version", b"grpc-timeout"})
# Fields a proxy must pass on as never indexed (RFC 7541 6.2.3, 7.1.3): credentials.
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
_cache: dict[Header, bytes] = {}
_cache[(b"grpc-message", b"")] = b"\x00\x0cgrpc-message\x00"  # every OK answer's (messages are not kept)


_BYTES = [bytes((i,)) for i in range(127)]  # a length under 127, as its one-byte HPACK integer


def _field(header: Header) -> bytes:
    name, value = header
    never = value.__class__ is not bytes or name in _SENSITIVE
    n, v = len(name), len(value)
    if n < 127 and v < 127:  # one byte each: nearly every field (one join: a third of the time of four +)
        field = b"".join((b"\x10" if never else b"\x00", _BYTES[n], name, _BYTES[v], value))
    else:
        field = (b"\x10" if never else b"\x00") + _encode_integer(n, 7) + name + _encode_integer(v, 7) + value
    if not never and name in _CACHED_NAMES and v < 128 and len(_cache) < 4096:
        _cache[header] = field
    return field


class Encoded(list):
    """A header list that carries its own encoding (``encoded``), made once for a list sent
    again and again (a client connection's upstream headers, grpc_front.py). Not to be
    changed once made."""

    __slots__ = ("encoded",)

    def __init__(self, headers: list[Header]):
        super().__init__(headers)
        self.encoded = encode(headers)


def encode(headers: list[Header], _get=_cache.get) -> bytes:  # noqa: B008 - bound once: this runs per call
    """Literal fields, new names, no Huffman: without indexing (RFC 7541 6.2.2), or never
    indexed (6.2.3) for credentials and for any field its sender sent so (a NeverIndexed
    value), so no peer or intermediary keeps them in a table."""
    if headers.__class__ is Encoded:
        return headers.encoded  # type: ignore[attr-defined]
    out = []
    for header in headers:
        field = _get(header)
        # A value sent never indexed equals, and so would find, a plain field's encoding.
        if field is None or header[1].__class__ is not bytes:
            field = _field(header)
        out.append(field)
    return b"".join(out)
