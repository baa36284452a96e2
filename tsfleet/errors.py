"""Every error the toolkit raises, in one place, each naming the HTTP status it stands for.

``FleetError`` subclasses are problems a user can fix; the CLI prints the message and
exits non-zero without a traceback. ``ApiError`` subclasses are TorchServe's own answers,
turned into types by ``api_error`` with the server's message kept.

An HTTP answer of tsfleet's own that says no has one body, TorchServe's shape
(``error_body``); ``http_answer`` is the one place an error becomes an HTTP answer, with
the status its class names (``http_status``).
"""
from __future__ import annotations

import errno
import json
from http import HTTPStatus
from pathlib import Path
from typing import ClassVar

# Each status's name as the "type" of an error body: "ServiceUnavailable", "RequestTimeout".
_STATUS_TYPES = {s.value: s.phrase.title().replace(" ", "").replace("-", "") for s in HTTPStatus}


def error_doc(code: int, message: str, kind: str | None = None, **more: object) -> dict[str, object]:
    """The error body as a document: ``{"code", "type", "message"}`` (the shape TorchServe's
    own errors have, so a client reads one kind of error whoever answered), then ``more``.
    ``kind`` is the "type"; by default the name of status ``code``."""
    return {"code": code, "type": kind or _STATUS_TYPES.get(code, "Error"), "message": message, **more}


def error_body(code: int, message: str, kind: str | None = None, **more: object) -> bytes:
    """``error_doc`` as the JSON bytes an answer carries."""
    return json.dumps(error_doc(code, message, kind, **more)).encode()


class FleetError(Exception):
    """A problem the user can fix; the message says what and where."""

    http_status: ClassVar[int] = 500


class ManifestError(FleetError):
    """The fleet manifest is invalid."""

    http_status = 400


class BuildError(FleetError):
    """An archive could not be built."""


class StorageError(FleetError, OSError):
    """A file could not be written: a full disk, a read-only mount, no permission. The file
    keeps its previous content (files.py replaces files whole). An OSError too, so code that
    already copes with a failed write (the router's quiet saves) goes on coping."""

    http_status = 507  # Insufficient Storage

    # The causes people act on, in their words; any other errno gets the system's message.
    CAUSES: ClassVar[dict[int, str]] = {
        errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    }

    @classmethod
    def writing(cls, path: object, exc: OSError, replaced: bool = False) -> "StorageError":
        """The error for ``exc`` raised while writing ``path``; ``replaced``: the new content
        was already in place when ``exc`` came (flushing its directory failed)."""
        name = Path(str(path)).name
        after = (f"the new {name} is in place but may not survive a power cut" if replaced
                 else f"{name} is as it was")
        error = cls(f"cannot write {path}: {cls.cause(exc)}; {after}")
        error.errno, error.strerror, error.filename = exc.errno, exc.strerror, str(path)
        return error

    @classmethod
    def cause(cls, exc: OSError) -> str:
        """Why ``exc`` refused a write, in the words people act on: "disk full (No space left on device)"."""
        cause, said = cls.CAUSES.get(exc.errno, ""), exc.strerror or str(exc)
        return cause if said.lower() == cause else f"{cause} ({said})" if cause else said

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ServerError(FleetError):
    """TorchServe could not be started or brought to ready."""

    http_status = 503


class NotAllReady(ServerError):
    """Fleet versions without a ready worker: ``failing`` ones keep dying at start (a broken
    archive, no GPU memory for them), the rest of ``missing`` were still loading at the deadline."""

    def __init__(self, message: str, missing: list[tuple[str, str]], failing: list[tuple[str, str]]):
        super().__init__(message)
        self.missing, self.failing = missing, failing


class Unreachable(ServerError):
    """Nothing answers at TorchServe's address (not running, wrong port)."""


class NoRouter(Unreachable):
    """No router listens at the admin address: TorchServe's clients are all there is."""


class VersionDidNotStart(FleetError):
    """A version's workers failed to start (a broken archive, no GPU memory left for it)."""

    http_status = 503

    def __init__(self, model: str, version: str, message: str):
        super().__init__(message)
        self.model, self.version = model, version


class WorkflowDidNotStart(FleetError):
    """A workflow's private model copies failed to start (a broken archive, no GPU memory)."""

    http_status = 503

    def __init__(self, workflow: str, message: str):
        super().__init__(message)
        self.workflow = workflow


class KubeError(FleetError):
    """The Kubernetes API refused a call (``status``: its HTTP status, 403 when RBAC forbids
    it, 409 when the object changed since it was read) or gave no answer (``status`` 0)."""

    http_status = 502

    def __init__(self, what: str, status: int, message: str):
        super().__init__(f"{what}: {status or 'no answer'} {message}")
        self.what, self.status, self.server_message = what, status, message


class ApiError(FleetError):
    """TorchServe answered a management call with an error."""

    def __init__(self, what: str, status: int, message: str):
        super().__init__(f"{what}: {status} {message}")
        self.what, self.status, self.server_message = what, status, message


class BadRequest(ApiError):
    http_status = 400


class Unauthorized(ApiError):
    """The key was missing, wrong or expired (TorchServe answers 400 or 401)."""

    http_status = 401


class Forbidden(ApiError):
    """E.g. unregistering a model's default version while others remain."""

    http_status = 403


class NotFound(ApiError):
    http_status = 404


class NotAllowed(ApiError):
    """The model API is disabled (enable_model_api=false)."""

    http_status = 405


class Conflict(ApiError):
    """The model version (or workflow) is already registered."""

    http_status = 409


class ServerFault(ApiError):
    http_status = 500


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: NotAllowed, 409: Conflict,
}


def api_error(what: str, status: int, message: str) -> ApiError:
    """The typed error for TorchServe's answer ``status`` with ``message``."""
    if status == 400 and ("Token Authorization failed" in message or "InvalidKey" in message):
        return Unauthorized(what, status, message)
    return _BY_STATUS.get(status, ServerFault)(what, status, message)


def http_answer(exc: FleetError) -> tuple[int, bytes]:
    """(status, error body) of the HTTP answer that stands for ``exc``: its class's
    ``http_status`` (a write the disk refused: 507), its message as the body's."""
    return exc.http_status, error_body(exc.http_status, str(exc))
