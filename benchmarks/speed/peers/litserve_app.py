"""LitServe with its batching: ``max_batch_size`` / ``batch_timeout`` on the LitAPI,
``workers_per_device`` inference processes on the CPU, and ``fast_queue`` (ZeroMQ between
the API server and the workers), which its docs recommend for throughput.

LitServe hands ``decode_request`` what its FastAPI endpoint parsed from the annotation of
``request``: the JSON object for text; for an image, the raw body (``bytes`` read as a
``Body``), so every server gets the same request bytes.

``python -m benchmarks.speed.peers.litserve_app PORT``, configured by ``PeerConfig``'s environment.
"""
# No `from __future__ import annotations`: LitServe reads decode_request's annotation as an object.

import sys
from typing import Annotated, Any

import litserve as ls
from fastapi import Body

from benchmarks.speed.peers.models import Model, PeerConfig


class TextApi(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model(PeerConfig.from_env())

    def decode_request(self, request: dict) -> Any:
        return request["text"]

    def predict(self, items: Any) -> Any:
        # A list when batching (max_batch_size > 1), one item otherwise.
        return self.model.predict_items(items) if isinstance(items, list) else self.model.predict_items([items])[0]

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output


class ImageApi(TextApi):
    def decode_request(self, request: Annotated[bytes, Body(media_type="image/png")]) -> Any:
        return request


def main() -> None:
    cfg = PeerConfig.from_env()
    api_type = TextApi if cfg.model == "text-embedder" else ImageApi
    api = api_type(max_batch_size=cfg.batch_size, batch_timeout=cfg.delay_ms / 1000, api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=cfg.workers, fast_queue=True,
                          timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
