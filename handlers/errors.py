"""Client-facing handler errors: each exception names the HTTP status it answers with.

The base handler turns any of these, raised while decoding one item of a batch, into
that item's own status and JSON body, so one bad request never fails its batch-mates.
"""
from __future__ import annotations

import json


class HandlerError(Exception):
    """An error about one request, answered with ``code`` and a JSON body."""

    code = 500
    type = "InternalServerError"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self, model: str, version: str) -> bytes:
        """The JSON error body TorchServe clients already know: code, type, message."""
        return json.dumps(
            {
                "code": self.code,
                "type": self.type,
                "message": f"{model} {version}: {self.message}",
            }
        ).encode()


class InternalError(HandlerError):
    """The model failed on this one request (500); its batch-mates were answered without it."""

    code = 500
    type = "InternalServerError"


class BadInput(HandlerError):
    """Malformed or invalid input (400). Its wire type stays "BadRequest", as clients know it;
    the class name differs from the control plane's ``tsfleet.errors.BadRequest`` (a 400 from
    TorchServe's management API) so neither reads as the other."""

    code = 400
    type = "BadRequest"


class PayloadTooLarge(HandlerError):
    """Input larger than the model's configured limit (413)."""

    code = 413
    type = "PayloadTooLarge"


class UnsupportedMediaType(HandlerError):
    """A body in a format the model does not accept (415)."""

    code = 415
    type = "UnsupportedMediaType"
