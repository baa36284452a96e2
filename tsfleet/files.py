"""Writing a file so that its readers, and a crash or a power cut, see the old content or the
new one, never half of one: a temporary file beside it, flushed to disk, renamed over it,
and the directory flushed so that the rename survives a power cut too.

Each write has a temporary file of its own (two writers of one file must not write into the
same temporary file, or one renames the other's half-written bytes into place). A write
that fails (a full disk, a read-only mount) removes its temporary file, leaves the file as
it was and raises StorageError, which names the file and the cause.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from tsfleet.errors import StorageError

# Temporary files start with this, so that one a crash left behind is recognisable (and
# hidden from a plain `ls`): `.tsfleet-tmp.router_state.json.k3j9x2`.
TMP_PREFIX = ".tsfleet-tmp."


@contextlib.contextmanager
def replacing(path: str | Path, private: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new content to, by any means (a zip
    library, another program); when the block ends it is flushed and renamed over ``path``.
    If the block raises, or the flush or the rename fails, the temporary file is removed and
    ``path`` keeps its old content; an OSError comes out as StorageError. ``private``: the
    file is readable by its owner only, from its first byte on."""
    path = Path(path)
    try:
        # mkstemp makes it 0600, so a private file is never readable by others, not even
        # while being written or as a crash's leftover.
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StorageError.writing(path, exc) from None
    tmp = Path(name)
    replaced = False
    try:
        try:
            if not private:
                os.fchmod(fd, _mode_for(path))
        finally:
            os.close(fd)
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        replaced = True
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # gone already, or the mount turned read-only meanwhile
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError.writing(path, exc, replaced) from None
        raise


def write_atomically(path: str | Path, data: bytes | str, private: bool = False) -> Path:
    """Replace ``path`` with ``data`` in one step; ``private`` makes it readable by its owner
    only. StorageError (an OSError) when it cannot be written; ``path`` is then as it was."""
    path = Path(path)
    view = memoryview(data.encode() if isinstance(data, str) else data)
    with replacing(path, private) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            while view:  # unbuffered: a full disk is raised here, not lost in a close
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return path


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not flags & os.O_DIRECTORY:
            raise  # EINVAL for a directory: a file system that cannot flush one, nothing to do
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    """The mode of the file being replaced (a chmod someone made stays), else what a plain
    open() would give it."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # Read, not set and reset: os.umask() changes it for every thread while it is read.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
