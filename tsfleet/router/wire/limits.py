"""The router's front-door limits, in one place: what each protects, its default, and what a
client gets when it fires; and a counter per limit, exported in ``/metrics``.

``RouterLimits`` is fleet.yaml's ``router.limits`` (tsfleet/manifest.py reads and checks it).
Every wire class a client talks to (http1.Listener and its connections, grpc_wire's
GrpcServerConnection) reads the values it needs into attributes once per connection, so the
per-frame and per-request paths cost what they did when these were module constants. Each
field's ``metadata`` says which fronts it applies to, what it protects and each front's
answer: ``python -m tsfleet.router.wire.limits`` prints docs/router.md's table from it, and a unit
test fails when that page drifts.

``LimitCounters`` counts, per front (``rest``, ``grpc``) of one process, how often each limit
fired: one integer add where it fires. A router of several processes adds the fronts'
counts up in the leader (router/processes.py), so ``/metrics`` shows every process's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

KIB, MIB = 1 << 10, 1 << 20


def _limit(default: float, protects: str, rest: str | None = None, grpc: str | None = None) -> Any:
    """A limit's field: its default, what it protects, and the answer a client of each front
    it applies to gets when it fires (None: it does not apply to that front)."""
    return field(default=default, metadata={"protects": protects, "rest": rest, "grpc": grpc})


@dataclass(frozen=True, slots=True)
class RouterLimits:
    """Per router process; every value must be positive. The defaults are safe for a router on
    loopback or behind a load balancer; docs/router.md's table says what each protects."""

    # Sockets and buffers of one process: REST and gRPC connections, each up to this many.
    connections: int = _limit(
        4096, "sockets and buffers of one process (REST and gRPC each)",
        rest="503, connection closed", grpc="closed at accept: UNAVAILABLE")
    # Calls open at once on one gRPC connection (its SETTINGS_MAX_CONCURRENT_STREAMS).
    streams_per_connection: int = _limit(
        1000, "calls held open on one connection", grpc="RST_STREAM REFUSED_STREAM: UNAVAILABLE")
    # A REST request's line and headers, as sent; also how much of pipelined requests is read
    # while one is answered (reading pauses past it).
    head_bytes: int = _limit(64 * KIB, "memory of one request head", rest="431, connection closed")
    # Header lines in one REST request head.
    header_lines: int = _limit(100, "parse time of one request head", rest="431, connection closed")
    # A chunked REST body's trailer section (read, never forwarded).
    trailer_bytes: int = _limit(8 * KIB, "memory of one chunked body's trailers", rest="431, connection closed")
    # One gRPC call's metadata, decoded (SETTINGS_MAX_HEADER_LIST_SIZE): HPACK lets 23 KiB
    # sent decode to 74 MiB. A block of over 4 times this as sent is refused before it is
    # all held, and that is a connection error (GOAWAY), as HPACK's state cannot be kept.
    header_list_bytes: int = _limit(
        64 * KIB, "memory of one call's metadata (HPACK amplification)",
        grpc="RESOURCE_EXHAUSTED (over 4x as sent: GOAWAY, UNAVAILABLE)")
    # A REST body; TorchServe's own max_request_size (10 MiB in config.properties) lies below
    # it, so that TorchServe's answer stays the one for bodies between the two.
    body_bytes: int = _limit(16 * MIB, "memory of one request body", rest="413, connection closed")
    # A gRPC request read whole before it is routed (calls of one message). `tsfleet route`
    # holds it to TorchServe's max_request_size too (under_torchserve), which TorchServe's
    # gRPC server answers with a bare reset, not a status.
    message_bytes: int = _limit(
        64 * MIB, "memory of one call's request (and never over TorchServe's max_request_size)",
        grpc="RESOURCE_EXHAUSTED")
    # What all calls of one gRPC connection hold of their requests at once (the windows alone
    # let one client send 64 MiB per stream).
    buffered_bytes: int = _limit(128 * MIB, "memory of one connection's requests", grpc="RESOURCE_EXHAUSTED")
    # Of one stream, waiting for a side that stopped reading (the client, or TorchServe); and
    # of one connection's answers written and not read (a client that opened its windows wide
    # and reads nothing: the connection is dropped).
    held_bytes: int = _limit(64 * MIB, "memory of answers a reader does not take (a stream, or a connection's)",
                             grpc="RESOURCE_EXHAUSTED (a connection's: dropped)")
    # From a request's first byte to its head being whole (REST); from a connection's start
    # to its preface, or from a header block's first frame to its last (gRPC): slow-loris.
    head_timeout_s: float = _limit(
        60.0, "connections held by heads sent a byte at a time (slow-loris)",
        rest="408, connection closed", grpc="GOAWAY: UNAVAILABLE")
    # From a request's first byte (REST) or its HEADERS (gRPC, calls of one message) to its
    # last: a body trickled in. gRPC's word for a call that took too long is DEADLINE_EXCEEDED
    # (not a CANCEL, which a client reads as its own cancelling).
    body_timeout_s: float = _limit(
        60.0, "connections and memory held by bodies trickled in",
        rest="408, connection closed", grpc="DEADLINE_EXCEEDED")
    # A keep-alive REST connection with no request under way is closed after this long.
    idle_timeout_s: float = _limit(75.0, "sockets of clients gone without closing", rest="connection closed")
    # Control frames one gRPC connection may send per second: each costs the router work.
    resets_per_second: int = _limit(500, "CPU (RST_STREAM flood, CVE-2023-44487)", grpc="GOAWAY: UNAVAILABLE")
    pings_per_second: int = _limit(1000, "CPU (PING flood)", grpc="GOAWAY: UNAVAILABLE")
    settings_per_second: int = _limit(100, "CPU (SETTINGS flood)", grpc="GOAWAY: UNAVAILABLE")


DEFAULT_LIMITS = RouterLimits()
NAMES = tuple(f.name for f in fields(RouterLimits))
FRONTS = ("rest", "grpc")
# Which limits each front has (and so exports a counter for).
OF_FRONT = {front: tuple(f.name for f in fields(RouterLimits) if f.metadata[front]) for front in FRONTS}


def with_values(values: Mapping[str, Any], where: str = "router.limits") -> RouterLimits:
    """Limits from a mapping (fleet.yaml's, or one sent to a front process); ValueError naming
    the key (under ``where``) for an unknown one or a value that is not a positive number of
    the field's kind."""
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(NAMES)})")
    for f in fields(RouterLimits):
        if f.name not in values:
            continue
        value = values[f.name]
        kinds = (int, float) if f.type == "float" else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            kind = "number" if f.type == "float" else "integer"
            raise ValueError(f"{where}.{f.name}: expected a positive {kind}, got {value!r}")
    return RouterLimits(**{name: values[name] for name in NAMES if name in values})


# What the router may add to a gRPC request on its way (the model_version it appends).
VERSION_ROOM = 1 * KIB


def under_torchserve(limits: RouterLimits, max_request_size: int | None) -> RouterLimits:
    """``limits`` with message_bytes no more than TorchServe takes (its config.properties'
    max_request_size, less VERSION_ROOM; None: unknown, unchanged). TorchServe's gRPC server
    (grpc-java) resets a larger call with CANCEL and no status: its own clients see CANCELLED;
    through the router it was UNAVAILABLE, and retried. Refused by the router instead, it is
    RESOURCE_EXHAUSTED, at once, counted. (REST needs nothing of the kind: TorchServe answers
    a body over it 413 itself.)"""
    if max_request_size is None or max_request_size - VERSION_ROOM >= limits.message_bytes:
        return limits
    return replace(limits, message_bytes=max(1, max_request_size - VERSION_ROOM))


def size(n: int) -> str:
    """A byte count as a limit's message says it: 64 MiB, 8 KiB, or 1,000 bytes."""
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n // KIB:,} KiB" if n % KIB == 0 else f"{n:,} bytes"


class LimitCounters:
    """How often each limit fired on one front of this process: ``counters.body_bytes += 1``."""

    __slots__ = NAMES

    def __init__(self) -> None:
        for name in NAMES:
            setattr(self, name, 0)

    def hit(self, name: str) -> None:
        """Count ``name`` (where the limit that fired is known by name only)."""
        setattr(self, name, getattr(self, name) + 1)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in NAMES}

    def add(self, counts: Mapping[str, int]) -> None:
        for name, n in counts.items():
            if name in NAMES:
                setattr(self, name, getattr(self, name) + int(n))


class LimitHits(Collector):
    """``tsfleet_router_limit_hits_total`` by limit and front, read at scrape time: the sum of
    ``sources()`` (each maps a front to its counters: this process's, and what the fronts
    sent the leader)."""

    def __init__(self, sources: Callable[[], Iterable[Mapping[str, LimitCounters]]]):
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        """One family, a sample for every limit of each front (0 until one fires)."""
        sources = list(self.sources())
        family = CounterMetricFamily("tsfleet_router_limit_hits_total",
                                     "Requests, calls and connections a router limit refused or closed "
                                     "(fleet.yaml router.limits), by limit and front.", labels=("limit", "front"))
        for front in FRONTS:
            for name in OF_FRONT[front]:
                family.add_metric((name, front), sum(getattr(source[front], name) for source in sources
                                                     if front in source))
        yield family


def prometheus(*sources: Mapping[str, LimitCounters]) -> str:
    """LimitHits over ``sources`` as /metrics text."""
    return generate_latest(LimitHits(lambda: sources)).decode()


def _value(f: Any) -> str:
    value = f.default
    if f.name.endswith("_bytes"):
        return size(value)
    if f.name.endswith("_s"):
        return f"{value:g} s"
    return f"{value:,}"


def table() -> str:
    """docs/router.md's table of the limits, from the fields above."""
    lines = ["| limit (`router.limits`) | default | protects | REST answer | gRPC answer |", "|---|---|---|---|---|"]
    for f in fields(RouterLimits):
        lines.append(f"| `{f.name}` | {_value(f)} | {f.metadata['protects']} | {f.metadata['rest'] or '-'} "
                     f"| {f.metadata['grpc'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
