"""FastAPI + uvicorn, one request per forward pass (FastAPI has no batching of its own).

``BENCH_PEER_STYLE=sync``: a ``def`` endpoint, which FastAPI runs in its thread pool (the
tutorial's way, and the peer's default row); ``async``: an ``async def`` endpoint that runs
the model on the event loop, one request at a time per process, which is what uvicorn's
``--workers`` scale out. Started by ``PeerServer`` as ``uvicorn benchmarks.speed.peers.fastapi_app:app``.
"""
from __future__ import annotations

import os

from fastapi import Depends, FastAPI, Request

from benchmarks.speed.peers.models import Model, PeerConfig

app = FastAPI()
model = Model(PeerConfig.from_env())


async def raw_body(request: Request) -> bytes:
    return await request.body()


if os.environ.get("BENCH_PEER_STYLE", "sync") == "sync":
    @app.post("/predict")
    def predict(body: bytes = Depends(raw_body)) -> dict:
        return model.predict([body])[0]
else:
    @app.post("/predict")
    async def predict_async(request: Request) -> dict:
        return model.predict([await request.body()])[0]


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
