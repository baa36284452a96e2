"""Decoding of image requests: PNG or JPEG as a raw body, a multipart file, or base64 in JSON.

The pixel count is checked from the header before any pixel is decoded, so a tiny file that
declares a 20000x20000 image (a decompression bomb) is refused without allocating it.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from handlers.errors import BadInput, PayloadTooLarge
from handlers.payload import Payload, is_empty

FORMATS = ("PNG", "JPEG")
JSON_TYPE = "application/json"
# What the image model accepts ("" is a body without a content type, as gRPC sends it; a
# multipart file field is read with its own part's type).
IMAGE_ACCEPTS = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream", JSON_TYPE, "")
JSON_FIELDS = ("image", "b64")


def _image_bytes(payload: Payload) -> bytes:
    media, value = payload.media_type, payload.value
    if is_empty(value):
        raise BadInput("empty body; send a PNG or JPEG image")
    if media == JSON_TYPE or isinstance(value, (dict, list)):
        doc = payload.json()
        if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in JSON_FIELDS:
            raise BadInput('expected JSON like {"image": "<base64 PNG or JPEG>"}')
        encoded = next(iter(doc.values()))
        if not isinstance(encoded, str) or not encoded:
            raise BadInput("'image' must be a non-empty base64 string")
        try:
            return base64.b64decode(encoded.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise BadInput("'image' is not valid base64") from None
    if isinstance(value, str):
        raise BadInput("body is text, not a PNG or JPEG image")
    return bytes(value)


def read_image(payload: Payload, max_pixels: int, max_bytes: int) -> Image.Image:
    """A fully decoded RGB-convertible image, or a HandlerError naming what is wrong."""
    data = _image_bytes(payload)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image dimensions exceed the limit of {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise BadInput("body is not a PNG or JPEG image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    if width == 0 or height == 0:
        raise BadInput("image has no pixels")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"{img.format} image is truncated or corrupt ({exc})") from None
    return img
