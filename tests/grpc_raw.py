"""One gRPC call sent as raw bytes (h2 for the framing): a message already compressed, or not
compressed as it says, which no grpcio client sends. And gzip bombs built in a blink."""
from __future__ import annotations

import socket
import zlib

import h2.config
import h2.connection
import h2.events
import h2.settings

PREDICT = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def bomb(mib: int, encoding: str = "gzip") -> bytes:
    """A stream that expands to ``mib`` MiB of zeros, in about ``mib`` KB: one MiB compressed
    after a full flush does not depend on what came before, so it is repeated; it has no end
    (nor a checksum), which a bounded reader never gets to."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    zeros = bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * (mib - 1)


def framed(payload: bytes, compressed: bool = True) -> bytes:
    return (b"\x01" if compressed else b"\x00") + len(payload).to_bytes(4, "big") + payload


def call(port: int, body: bytes, metadata: list[tuple[str, str]], path: str = PREDICT,
         timeout: float = 30) -> dict[str, str]:
    """Send one call's ``body`` (framed messages) with ``metadata``; the answer's headers and
    trailers as one dict (grpc-status, grpc-message, ...), or {"reset": code} when the stream
    was reset, {"goaway": code} when the connection was."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    try:
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        conn.increment_flow_control_window(1 << 30)
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                                   ("te", "trailers"), *metadata])
        sock.sendall(conn.data_to_send())
        pending, answer = memoryview(body), {}
        while True:
            # As much of the body as the windows allow, then what the peer says.
            while pending:
                n = min(len(pending), conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                conn.send_data(stream, bytes(pending[:n]), end_stream=n == len(pending))
                pending = pending[n:]
            if not body:
                conn.end_stream(stream)
                body = b"-"  # ended once
            sock.sendall(conn.data_to_send())
            data = sock.recv(1 << 16)
            if not data:
                return answer or {"closed": "1"}
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answer.update(dict(event.headers))
                    if isinstance(event, h2.events.TrailersReceived) or event.stream_ended:
                        return answer
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    return answer or {"reset": str(int(event.error_code))}
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return answer or {"goaway": str(int(event.error_code))}
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    finally:
        sock.close()
