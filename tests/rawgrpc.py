"""A gRPC client written by hand on h2, to send a Workload API what real clients never do.

Blocking, with a timeout on every socket operation; async tests call it through asyncio.to_thread so
that the server under test, on the test's event loop, keeps running.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from h2 import events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError

__all__ = ["Outcome", "RawGrpcConnection", "grpc_frame"]

SECURITY_HEADER = ("workload.spiffe.io", "true")


def grpc_frame(message: bytes, *, declared: int | None = None, flag: int = 0) -> bytes:
    """A gRPC length-prefixed message; `declared` puts another length in the prefix."""
    return struct.pack(">BI", flag, len(message) if declared is None else declared) + message


@dataclass
class Outcome:
    """How a stream ended, as far as the client saw it."""

    status: int | None = None  # grpc-status of the trailers; None: no trailers (yet)
    message: str = ""
    reset: ErrorCodes | int | None = None  # RST_STREAM error code, if the server reset the stream
    data: bytes = b""  # response bytes (gRPC framed)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status is not None or self.reset is not None


class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server on a Unix socket."""

    def __init__(self, path: Path, *, timeout: float = 5.0, preface: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.outcomes: dict[int, Outcome] = {}
        self.closed = False  # the server closed the connection
        self.goaway: tuple[ErrorCodes | int, bytes] | None = None
        self._speaking_h2 = preface  # without the preface, what the server sends is only read, not parsed
        if preface:
            self.h2.initiate_connection()
            self._flush()

    def close(self) -> None:
        self.sock.close()

    # -- sending ---------------------------------------------------------------------------------------

    def request(
        self, method: str = "FetchX509SVID", *, end_stream: bool = False, header: bool = True, flush: bool = True
    ) -> int:
        """Open a stream with a gRPC request's HEADERS (sent at once unless not `flush`); its id."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/SpiffeWorkloadAPI/{method}"),
                   (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]
        if header:
            headers.append(SECURITY_HEADER)
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.outcomes[stream_id] = Outcome()
        if flush:
            self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end_stream: bool = False, frame_size: int | None = None) -> None:
        """Send `data` on the stream in frames of at most `frame_size` bytes; must fit the windows."""
        size = frame_size or self.h2.max_outbound_frame_size
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for index, chunk in enumerate(chunks):
            self.h2.send_data(stream_id, chunk, end_stream=end_stream and index == len(chunks) - 1)
        self._flush()

    def push(self, stream_id: int, total: int, *, within: float) -> int:
        """Send up to `total` zero bytes on the stream as flow control allows, until the stream ends,
        the connection closes, or `within` seconds pass; how many bytes were sent."""
        return self.send_flowing(stream_id, bytes(total), within=within)

    def send_flowing(self, stream_id: int, data: bytes, *, end_stream: bool = False, within: float) -> int:
        """Send `data` as flow control allows, waiting for the server to open its windows, until all
        went, the stream ends, the connection closes, or `within` seconds pass; how many bytes were sent."""
        deadline = time.monotonic() + within
        view = memoryview(data)
        sent = 0
        while sent < len(data) and not self.outcomes[stream_id].ended and not self.closed:
            try:
                size = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size,
                           len(data) - sent)
            except StreamClosedError:
                break
            if size <= 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.receive(min(remaining, 0.2))
                continue
            self.h2.send_data(stream_id, bytes(view[sent : sent + size]),
                              end_stream=end_stream and sent + size == len(data))
            sent += size
            if not self._flush(deadline):
                break
        return sent

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._flush()

    def send_raw(self, data: bytes, *, within: float) -> int:
        """Write bytes straight to the socket, without reading, until `within` seconds pass; how many went."""
        deadline = time.monotonic() + within
        sent = 0
        while sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(max(remaining, 0.001))
            try:
                sent += self.sock.send(data[sent : sent + 65536])
            except TimeoutError:
                break
        return sent

    # -- receiving -------------------------------------------------------------------------------------

    def receive(self, timeout: float) -> None:
        """Read once (up to `timeout` seconds) and take in what the server sent."""
        if self.closed:
            return
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        if not self._speaking_h2:
            return
        for event in self.h2.receive_data(data):
            self._take(event)
        self._flush()

    def wait_for(self, stream_id: int, *, within: float) -> Outcome:
        """The stream's outcome once it ended, or as it stands after `within` seconds."""
        deadline = time.monotonic() + within
        while not self.outcomes[stream_id].ended and not self.closed and time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())
        return self.outcomes[stream_id]

    def wait_for_data(self, stream_id: int, *, within: float) -> Outcome:
        deadline = time.monotonic() + within
        outcome = self.outcomes[stream_id]
        while not outcome.data and not outcome.ended and not self.closed and time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())
        return outcome

    def wait_closed(self, *, within: float) -> bool:
        """True once the server closed the connection, within `within` seconds."""
        deadline = time.monotonic() + within
        while not self.closed and time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())
        return self.closed

    def _take(self, event: events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        outcome = self.outcomes.get(stream_id) if stream_id is not None else None
        if isinstance(event, events.ConnectionTerminated):
            self.goaway = (event.error_code or 0, event.additional_data or b"")
        elif outcome is None:
            return
        elif isinstance(event, events.ResponseReceived):
            outcome.headers = dict(event.headers or [])
            if "grpc-status" in outcome.headers:  # trailers-only
                self._trailers(outcome, outcome.headers)
        elif isinstance(event, events.TrailersReceived):
            self._trailers(outcome, dict(event.headers or []))
        elif isinstance(event, events.DataReceived):
            outcome.data += event.data or b""
            if event.flow_controlled_length and stream_id is not None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, events.StreamReset):
            outcome.reset = event.error_code

    @staticmethod
    def _trailers(outcome: Outcome, trailers: dict[str, str]) -> None:
        outcome.status = int(trailers["grpc-status"])
        outcome.message = unquote(trailers.get("grpc-message", ""))

    def _flush(self, deadline: float | None = None) -> bool:
        data = self.h2.data_to_send()
        if not data:
            return True
        if deadline is None:
            self.sock.sendall(data)
            return True
        # The server may stop reading: send what it takes until the deadline.
        return self.send_raw(data, within=deadline - time.monotonic()) == len(data)
