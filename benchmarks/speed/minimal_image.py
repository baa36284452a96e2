"""A minimal hand-written TorchServe handler for the shape CNN, no toolkit base class,
hand-tuned batching in the benchmark's manifest; answers are dicts TorchServe serialises."""
import io
from typing import Any

import torch
from PIL import Image

from handlers.shapes import image_to_tensor, load_shape_cnn


class MinimalImageClassifier:
    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        self.model, self.labels = load_shape_cnn(context.system_properties["model_dir"] + "/shape_cnn.pt")
        self.initialized = True

    def handle(self, data: list[dict], context: Any) -> list[dict]:
        images = [Image.open(io.BytesIO(row.get("body") or row.get("data"))) for row in data]
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.stack([image_to_tensor(i) for i in images])), dim=-1)
        scores, idx = probs.topk(3, dim=-1)
        answers = []
        for s_row, i_row in zip(scores.tolist(), idx.tolist()):
            top = [{"label": self.labels[i], "score": s} for s, i in zip(s_row, i_row)]
            answers.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return answers
