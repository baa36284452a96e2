"""mosec (Rust HTTP front, Python workers over Unix sockets) with its dynamic batching:
``max_batch_size`` / ``max_wait_time`` per worker stage, ``num`` worker processes.

``python -m benchmarks.speed.peers.mosec_app --address 127.0.0.1 --port PORT --path DIR``
(mosec's own command line), configured by ``PeerConfig``'s environment.
"""
from __future__ import annotations

import json
from typing import Any

from mosec import Server, Worker

from benchmarks.speed.peers.models import Model, PeerConfig


class Predict(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model(PeerConfig.from_env())

    def deserialize(self, data: bytes) -> bytes:
        return data  # raw bodies: the model decodes JSON text or image bytes itself

    def serialize(self, data: Any) -> bytes:
        # mosec's default JSON is indented (4x the bytes of an embedding); compact, as every
        # other system here answers.
        return json.dumps(data, separators=(",", ":")).encode()

    def forward(self, data: Any) -> Any:
        # A list when batching (max_batch_size > 1), one body otherwise.
        return self.model.predict(data) if isinstance(data, list) else self.model.predict([data])[0]


def main() -> None:
    cfg = PeerConfig.from_env()
    server = Server()
    # The workers inherit PeerConfig's environment (threads included) from this process.
    server.append_worker(Predict, num=cfg.workers, max_batch_size=cfg.batch_size, max_wait_time=cfg.delay_ms,
                         route="/predict")
    server.run()


if __name__ == "__main__":
    main()
