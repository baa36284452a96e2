"""A gRPC message's decompression (``grpc-encoding`` gzip or deflate), bounded.

A few KB of gzip expand to GBs: gzip.decompress and zlib.decompress hold all of it before
anyone can look at its size. Here zlib's ``max_length`` stops the output one byte past the
limit, so a bomb costs the router at most the limit (router.limits.message_bytes, which
applies to what the router reads, not to what was sent)."""
from __future__ import annotations

import zlib

from tsfleet.router.wire.limits import size


class MessageTooLarge(ValueError):
    """The message decompresses to more than the limit (gRPC RESOURCE_EXHAUSTED)."""


class NotEncoded(ValueError):
    """The bytes are not in the encoding the call names: corrupt or truncated (INVALID_ARGUMENT)."""


# zlib's window bits per grpc-encoding: gzip's header and trailer, or deflate's (zlib's) ones.
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def decompress(payload: bytes | memoryview, encoding: bytes, limit: int) -> bytes | None:
    """``payload`` decompressed, never more than ``limit`` bytes of it; None for an encoding
    the router cannot read. Raises MessageTooLarge past ``limit``, NotEncoded for bytes that
    are not ``encoding``."""
    wbits = _WBITS.get(encoding)
    if wbits is None:
        return None
    name = encoding.decode()
    out, rest = bytearray(), payload
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            # One byte past what is left: that it is there is all the limit needs to know.
            out += inflater.decompress(rest, limit - len(out) + 1)
        except zlib.error as exc:
            raise NotEncoded(f"the message is not valid {name} ({exc})") from None
        if len(out) > limit:
            raise MessageTooLarge(f"request larger than the router's {size(limit)} once decompressed")
        if not inflater.eof:
            raise NotEncoded(f"the message is not valid {name} (truncated)")
        rest = inflater.unused_data
        # As before the bound: zlib.decompress ignored bytes after a deflate stream, and
        # gzip.decompress read another member after a gzip one (refusing anything else).
        if not rest or encoding == b"deflate":
            return bytes(out)
