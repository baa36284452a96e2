"""Ray Serve with ``@serve.batch``: ``num_replicas`` replica processes, each given as many
CPUs as it runs torch threads, behind Ray's HTTP proxy; the Ray instance is local, sized to
the machine, without the dashboard.

``python -m benchmarks.speed.peers.ray_app PORT``, configured by ``PeerConfig``'s environment.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import ray
from ray import serve
from starlette.requests import Request

from benchmarks.speed.peers.models import Model, PeerConfig

CFG = PeerConfig.from_env()


@serve.deployment(num_replicas=CFG.workers, ray_actor_options={"num_cpus": max(1, CFG.threads)},
                  max_ongoing_requests=256)
class Predict:
    def __init__(self) -> None:
        self.model = Model(CFG)

    @serve.batch(max_batch_size=CFG.batch_size, batch_wait_timeout_s=CFG.delay_ms / 1000)
    async def batch(self, bodies: list[bytes]) -> list[dict]:
        return self.model.predict(bodies)

    async def __call__(self, request: Request) -> dict:
        return await self.batch(await request.body())


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
    serve.run(Predict.bind(), route_prefix="/predict")
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
