"""Bytes on the wire: HTTP/1.1 and HTTP/2 parsers and framing, HPACK, gRPC message framing and
the upstream connection pools. Nothing here knows a model, a version or a routing rule."""
