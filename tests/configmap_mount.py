"""A directory laid out and updated as the kubelet does a mounted ConfigMap, for the tests of
the routes file (tsfleet/router/routes_file.py).

The kubelet writes each version of the ConfigMap into a fresh ``..<timestamp>`` directory,
points a new ``..data_tmp`` symlink at it and renames that over ``..data`` (one atomic
step), then removes the old directory; each key is a symlink ``KEY -> ..data/KEY`` made once.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


class MountedConfigMap:
    """``root`` as a ConfigMap volume whose key ``key`` is published by ``publish``."""

    def __init__(self, root: Path, key: str = "routes.json"):
        self.root, self.key, self.swaps = Path(root), key, 0
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """What a container reads: ``<mount>/<key>``."""
        return self.root / self.key

    def publish(self, content: str | bytes) -> Path:
        """The kubelet's update: a new timestamped directory, ``..data`` swapped onto it."""
        self.swaps += 1
        stamp = self.root / f"..2026_12_07_10_00_{self.swaps:02d}.{4000000 + self.swaps}"
        stamp.mkdir()
        (stamp / self.key).write_bytes(content.encode() if isinstance(content, str) else content)
        data, tmp = self.root / "..data", self.root / "..data_tmp"
        old = os.readlink(data) if data.is_symlink() else None
        os.symlink(stamp.name, tmp)
        os.rename(tmp, data)  # the one atomic step: readers see the old content or the new
        if not self.path.is_symlink():
            os.symlink(f"..data/{self.key}", self.path)
        if old:
            shutil.rmtree(self.root / old)
        return stamp
