"""Closed-loop load: wrk when it is installed, else an asyncio (aiohttp) loop; gRPC always
from a small asyncio client over the router's generated stubs.

With ``think_s`` each client waits a random (exponential) time between its requests, so the
server sees a steady, Poisson-like load below its capacity instead of a full queue: what
the router's added latency is measured at (at saturation every client waits for a core,
and any CPU the router takes shows up as queueing, not as its own work).

Every generator cycles through the same fixed bodies and returns one ``Sample``: requests,
failures (non-2xx, socket errors, timeouts, and with an ``AnswerCheck`` every 200 whose body
is not the model's answer), throughput and latency percentiles.

The ``*_side_by_side`` forms load two targets (direct and through the router) in the same
window: the same batches, the same busy cores, the same slow second of a noisy machine land on
both, so the difference between their latencies is the path's own cost and not the drift
between two windows. wrk runs one process per target with half the connections each; the
asyncio generators send each client's requests to the targets in turn.
"""
from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable


@dataclass(frozen=True)
class AnswerCheck:
    """What every 200 must carry: ``lua``, a Lua expression over ``body`` for wrk's
    ``response`` hook, and ``py`` the same test for the Python generator. A 200 that fails
    it counts as failed (a server that answers fast but wrong gains nothing)."""

    lua: str
    py: Callable[[bytes], bool]


@dataclass
class Sample:
    """One timed window of load against one target."""

    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _percentiles(latencies: list[float], requests: int, failed: int, seconds: float) -> Sample:
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return Sample(requests, failed, requests / seconds if seconds else 0.0, pct(0.5), pct(0.99))


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(data: bytes) -> str:
    # Decimal escapes carry any byte (PNG bodies included) through a Lua string literal.
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def _lua_script(bodies: list[bytes], headers: dict[str, str], think_s: float = 0.0, seed: int = 1,
                check: AnswerCheck | None = None) -> str:
    # Its own seed per wrk process: side by side, two processes must not think in lockstep.
    lines = [f"math.randomseed({seed})",
             "local bodies = {" + ",\n".join(_lua_string(b) for b in bodies) + "}",
             "local headers = {}"]
    lines += [f"headers[{_lua_string(k.encode())}] = {_lua_string(v.encode())}" for k, v in headers.items()]
    lines += ["local i = 0",
              "request = function()",
              "  i = i % #bodies + 1",
              '  return wrk.format("POST", nil, headers, bodies[i])',
              "end"]
    if think_s > 0:  # wrk waits delay() ms after each answer before the connection's next request
        lines += [f"local think = {think_s * 1000:.3f}",
                  "delay = function()",
                  "  return -math.log(1 - math.random()) * think",
                  "end"]
    if check:  # `bad` is global: done() reads each thread's count with thread:get
        lines += ["bad = 0",
                  "local threads = {}",
                  "setup = function(thread) table.insert(threads, thread) end",
                  "response = function(status, headers, body)",
                  f"  if status == 200 and not ({check.lua}) then bad = bad + 1 end",
                  "end",
                  "done = function(summary, latency, requests)",
                  "  local n = 0",
                  "  for _, t in ipairs(threads) do n = n + t:get(\"bad\") end",
                  '  io.write(string.format("bad answers: %d\\n", n))',
                  "end"]
    return "\n".join(lines) + "\n"


def _wrk_ms(out: str, label: str) -> float:
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no {label}th percentile:\n{out}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _start_wrk(script: Path, url: str, clients: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
         "--latency", "-s", str(script), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wrk_sample(proc: subprocess.Popen, seconds: float) -> Sample:
    try:
        out, err = proc.communicate(timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    if proc.returncode != 0 or not total:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}{err}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"^bad answers: (\d+)", out, re.M)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0) \
        + (int(bad.group(1)) if bad else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return Sample(int(total.group(1)), failed, rps, _wrk_ms(out, "50"), _wrk_ms(out, "99"))


def run_wrk(url: str, bodies: list[bytes], headers: dict[str, str], clients: int, seconds: float,
            think_s: float = 0.0, check: AnswerCheck | None = None) -> Sample:
    """``wrk -t1 -c clients`` for ``seconds``: one thread, so it takes as little CPU as it can."""
    return run_wrk_side_by_side([url], bodies, headers, clients, seconds, think_s, check)[0]


def run_wrk_side_by_side(urls: list[str], bodies: list[bytes], headers: dict[str, str], clients: int,
                         seconds: float, think_s: float = 0.0, check: AnswerCheck | None = None) -> list[Sample]:
    """One wrk per URL, all started together, ``clients`` connections shared out among them."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        procs = []
        for n, url in enumerate(urls):
            script = Path(tmp) / f"post-{n}.lua"
            script.write_text(_lua_script(bodies, headers, think_s, seed=n + 1, check=check))
            procs.append(_start_wrk(script, url, max(1, clients // len(urls)), seconds))
        return [_wrk_sample(proc, seconds) for proc in procs]


async def _closed_loop(calls: list[Callable[[int], Awaitable[bool]]], clients: int, seconds: float,
                       think_s: float = 0.0) -> list[Sample]:
    """``clients`` coroutines, each awaiting a call (True: success) back to back (or ``think_s``
    apart on average) until ``seconds`` have passed; every latency recorded. With several
    ``calls`` each client sends its requests to them in turn; one Sample per call."""
    latencies: list[list[float]] = [[] for _ in calls]
    failed = [0] * len(calls)
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            which = i % len(calls)
            t0 = time.perf_counter()
            ok = await calls[which](i)
            i += 1
            latencies[which].append(time.perf_counter() - t0)
            failed[which] += not ok
            if think_s > 0:
                await asyncio.sleep(random.expovariate(1 / think_s))

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    took = time.perf_counter() - started
    return [_percentiles(lat, len(lat), bad, took) for lat, bad in zip(latencies, failed)]


async def _http_loop(urls: list[str], bodies: list[bytes], headers: dict[str, str], clients: int,
                     seconds: float, think_s: float, check: AnswerCheck | None = None) -> list[Sample]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients * len(urls), force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        def caller(url: str) -> Callable[[int], Awaitable[bool]]:
            async def call(i: int) -> bool:
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                        body = await resp.read()
                        return resp.status == 200 and (check is None or check.py(body))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return False
            return call

        return await _closed_loop([caller(u) for u in urls], clients, seconds, think_s)


def run_python(url: str, bodies: list[bytes], headers: dict[str, str], clients: int, seconds: float,
               think_s: float = 0.0, check: AnswerCheck | None = None) -> Sample:
    """The fallback HTTP generator: ``clients`` coroutines on one event loop."""
    return asyncio.run(_http_loop([url], bodies, headers, clients, seconds, think_s, check))[0]


def run_python_side_by_side(urls: list[str], bodies: list[bytes], headers: dict[str, str], clients: int,
                            seconds: float, think_s: float = 0.0) -> list[Sample]:
    """The fallback generator, each client's requests going to ``urls`` in turn."""
    return asyncio.run(_http_loop(urls, bodies, headers, clients, seconds, think_s))


GRPC_CONNECTIONS = 4  # per target: the connections several client processes would open


async def _grpc_loop(targets: list[str], model: str, bodies: list[bytes], key: str, clients: int,
                     seconds: float, think_s: float) -> list[Sample]:
    import grpc

    from tsfleet.router.proto import inference_pb2, inference_pb2_grpc

    metadata = (("authorization", f"Bearer {key}"),)
    requests = [inference_pb2.PredictionsRequest(model_name=model, input={"data": b}) for b in bodies]
    # Each channel its own TCP connection (grpc would otherwise share one per target), so the
    # load reaches every process of a server that spreads connections (route --processes).
    per_target = [[grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)])
                   for _ in range(GRPC_CONNECTIONS)] for t in targets]
    try:
        def caller(channels: list[grpc.aio.Channel]) -> Callable[[int], Awaitable[bool]]:
            stubs = [inference_pb2_grpc.InferenceAPIsServiceStub(c) for c in channels]

            async def call(i: int) -> bool:
                try:
                    await stubs[(i // len(targets)) % len(stubs)].Predictions(
                        requests[i % len(requests)], metadata=metadata, timeout=30)
                    return True
                except grpc.aio.AioRpcError:
                    return False
            return call

        return await _closed_loop([caller(c) for c in per_target], clients, seconds, think_s)
    finally:
        for channels in per_target:
            for channel in channels:
                await channel.close()


def run_grpc(target: str, model: str, bodies: list[bytes], key: str, clients: int, seconds: float,
             think_s: float = 0.0) -> Sample:
    """``clients`` concurrent gRPC Predictions calls in a closed loop for ``seconds``."""
    return asyncio.run(_grpc_loop([target], model, bodies, key, clients, seconds, think_s))[0]


def run_grpc_side_by_side(targets: list[str], model: str, bodies: list[bytes], key: str, clients: int,
                          seconds: float, think_s: float = 0.0) -> list[Sample]:
    """As run_grpc, each client's calls going to ``targets`` in turn."""
    return asyncio.run(_grpc_loop(targets, model, bodies, key, clients, seconds, think_s))


class HttpLoad:
    """The HTTP generator chosen once per run, so every HTTP row of a run uses the same tool."""

    def __init__(self, tool: str = "auto"):
        self.tool = ("wrk" if wrk_available() else "python") if tool == "auto" else tool
        if self.tool == "wrk" and not wrk_available():
            raise RuntimeError("--load wrk asked for, but wrk is not on PATH")

    def __call__(self, url: str, bodies: list[bytes], headers: dict[str, str], clients: int,
                 seconds: float, think_s: float = 0.0, check: AnswerCheck | None = None) -> Sample:
        run = run_wrk if self.tool == "wrk" else run_python
        return run(url, bodies, headers, clients, seconds, think_s, check)

    def side_by_side(self, urls: list[str], bodies: list[bytes], headers: dict[str, str], clients: int,
                     seconds: float, think_s: float = 0.0) -> list[Sample]:
        """``clients`` in all, loading every URL in the same window; one Sample per URL."""
        run = run_wrk_side_by_side if self.tool == "wrk" else run_python_side_by_side
        return run(urls, bodies, headers, clients, seconds, think_s)
