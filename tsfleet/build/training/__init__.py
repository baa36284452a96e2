"""Build-time training code for the fleet's small models, and what they share."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from tsfleet.files import write_atomically


@contextlib.contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[None]:
    """Seed torch, pin its thread count and force deterministic kernels; restore all on exit.

    The global RNG is forked rather than reseeded so that training inside a test or a build
    step does not change the random stream of the code around it.
    """
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Float reductions split across threads add up in a thread-dependent order.
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` so that equal objects give byte-identical files."""
    # torch.save names the zip's root folder after the target file; saving to a buffer
    # fixes it, so the bytes do not depend on the file name. The rename keeps a crash
    # from leaving a half-written model behind.
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, buf.getvalue())
