"""The Workload API's HTTP/2 connections, checked before grpclib holds anything a caller sends.

grpclib trusts the 5-byte gRPC length prefix: asked for a 4 GiB message, it acknowledges DATA as it
reads it and holds all of it before the handler gets the message. So the guard sits between h2 and
grpclib, in a subclass of grpclib's EventsProcessor that a subclass of its H2Protocol installs on
each connection GuardedServer accepts (limits.py has the numbers and why):

- every DATA frame of a request passes through the request's framing: a request that declares more
  than `max_request_bytes`, is compressed, or ends in the middle of a message is answered at once
  (InvalidArgument, Unimplemented) and the stream reset; none of it reaches grpclib, and the
  stream's handler is cancelled before it has attested anyone;
- the flow-control windows are HTTP/2's default of 65,535 bytes, for the connection and each stream,
  instead of grpclib's 4 MiB: that is all a connection can make the agent hold without reading it;
- SO_PEERCRED's uid at accept counts each connection against its uid's connections, and each
  request against its uid's open streams: over a cap the connection gets GOAWAY (ENHANCE_YOUR_CALM)
  and is closed, the stream gets ResourceExhausted; other uids are not counted against;
- a connection that has sent no complete request within `first_request_timeout` gets GOAWAY and is
  closed;
- while the agent cannot write to a connection (the caller does not read), it stops reading from
  it, so answers to PING and SETTINGS cannot pile up in the agent.

Each refusal is a log line `workload api caller refused` with the uid, pid, `code` and `reason`; at
most one per uid and code a minute, the next one saying how many were left out (`suppressed`).
These refusals happen below the RPC, so they are not Decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import AbstractHandler, Connection, EventsProcessor, H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Server
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.stream import StreamState

from vouchd.agent.workload_api.errors import PeerError
from vouchd.agent.workload_api.limits import ConnectionLimits, UidCounts
from vouchd.agent.workload_api.peer import PeerCredentials, socket_credentials
from vouchd.attestors.workload.throttle import UidWarnings

__all__ = ["FLOW_CONTROL_WINDOW", "GuardedServer"]

# HTTP/2's default initial window, and the smallest grpclib accepts. Requests are at most
# MAX_REQUEST_BYTES and read as they arrive, so a larger window would only let a caller park more.
FLOW_CONTROL_WINDOW = 65_535
_UNKNOWN_CALLER = PeerCredentials(pid=-1, uid=-1, gid=-1)

_log = logging.getLogger("vouchd.workload_api")


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: str  # the log line's `code`
    status: Status  # what the caller gets
    public: str  # the caller's grpc-message
    detail: str  # the log line's `reason`


class GuardedServer(Server):
    """grpclib's Server, with every connection guarded as the module says."""

    def __init__(self, handlers: Collection[Any], limits: ConnectionLimits) -> None:
        super().__init__(
            handlers,
            config=Configuration(
                http2_connection_window_size=FLOW_CONTROL_WINDOW, http2_stream_window_size=FLOW_CONTROL_WINDOW
            ),
        )
        self._guard = _Guard(limits)

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's factory registers the connection's handler with the server (so close() reaches
        # it); the guarded protocol takes that handler over.
        plain = super()._protocol_factory()
        return _GuardedConnection(plain.handler, plain.config, plain.h2_config, self._guard)


class _Guard:
    """What all connections of one server share: the limits, the per-uid counts, the refusal log."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.connections = UidCounts(limits.connections_per_uid)
        self.streams = UidCounts(limits.streams_per_uid)
        # A caller refused in a loop must not fill the journal: one line per uid and kind a minute.
        self._warnings = UidWarnings(_log)

    def refused(self, caller: PeerCredentials, code: str, detail: str) -> None:
        self._warnings.warn(caller.uid, code, "workload api caller refused",
                            extra={"code": code, "reason": detail, "pid": caller.pid})


class _GuardedConnection(H2Protocol):
    """grpclib's protocol for one connection, counted against its uid and guarded (see the module)."""

    processor: _GuardedEvents

    def __init__(
        self, handler: AbstractHandler, config: Configuration, h2_config: H2Configuration, guard: _Guard
    ) -> None:
        super().__init__(handler, config, h2_config)
        self.guard = guard
        self.caller = _UNKNOWN_CALLER
        self._transport: asyncio.Transport | None = None
        self._counted = False
        self._first_request: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Replaces grpclib's processor before it has seen any event.
        self.processor = _GuardedEvents(self.handler, self.connection, self)
        self._transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(PeerError):  # else counted as uid -1; attestation refuses its requests
            self.caller = socket_credentials(transport.get_extra_info("socket"))
        if not self.guard.connections.take(self.caller.uid):
            self._close(
                _Refusal("too_many_connections", Status.RESOURCE_EXHAUSTED, "too many connections",
                         f"uid {self.caller.uid} holds {self.guard.connections.cap} connections"),
                ErrorCodes.ENHANCE_YOUR_CALM,
            )
            return
        self._counted = True
        self._first_request = asyncio.get_running_loop().call_later(
            self.guard.limits.first_request_timeout, self._no_request_in_time
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_complete()
        super().connection_lost(exc)
        self.processor.release_all()
        if self._counted:
            self._counted = False
            self.guard.connections.give_back(self.caller.uid)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def request_complete(self) -> None:
        """A complete request arrived (or the connection ended): the first-request deadline is met."""
        if self._first_request is not None:
            self._first_request.cancel()
            self._first_request = None

    def refuse_stream(self, stream_id: int, refusal: _Refusal) -> None:
        """Answer the stream with the refusal's status, reset it (if the caller is still sending), log it."""
        self.guard.refused(self.caller, refusal.code, refusal.detail)
        h2 = _h2_connection(self.connection)
        stream = h2.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        state = stream.state_machine
        if state.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            headers = [("grpc-status", str(refusal.status.value)),
                       ("grpc-message", encode_grpc_message(refusal.public))]
            if not state.headers_sent:  # a trailers-only response
                headers = [(":status", "200"), ("content-type", "application/grpc"), *headers]
            h2.send_headers(stream_id, headers, end_stream=True)
        if not stream.closed:
            h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self.connection.flush()

    def _no_request_in_time(self) -> None:
        self._first_request = None
        timeout = self.guard.limits.first_request_timeout
        self._close(
            _Refusal("no_request_in_time", Status.DEADLINE_EXCEEDED, f"no request within {timeout:g}s",
                     f"no complete request within {timeout:g}s of connecting"),
            ErrorCodes.NO_ERROR,
        )

    def _close(self, refusal: _Refusal, error_code: ErrorCodes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self.guard.refused(self.caller, refusal.code, refusal.detail)
        with contextlib.suppress(H2ProtocolError):  # the caller already said GOAWAY
            _h2_connection(self.connection).close_connection(error_code, additional_data=refusal.public.encode())
            self.connection.flush()
        # abort, not close: close() would wait for a caller that does not read to take what is queued.
        self._transport.abort()


class _GuardedEvents(EventsProcessor):
    """grpclib's h2 event processing for one connection, with each request's framing checked first."""

    def __init__(self, handler: AbstractHandler, connection: Connection, owner: _GuardedConnection) -> None:
        super().__init__(handler, connection)
        self._owner = owner
        self._framing: dict[int, _RequestFraming] = {}
        self._releases: dict[int, Callable[[], None]] = {}

    def register(self, stream: H2Stream) -> Callable[[], None]:
        release_in_grpclib = super().register(stream)
        stream_id = stream.id
        assert stream_id is not None

        def release() -> None:
            # Called by the stream's handler when it ends, and by the guard when it ends the stream
            # itself: a handler cancelled before it started never calls it.
            if self._releases.pop(stream_id, None) is None:
                return
            self._framing.pop(stream_id, None)
            self._owner.guard.streams.give_back(self._owner.caller.uid)
            release_in_grpclib()

        self._releases[stream_id] = release
        return release

    def release_all(self) -> None:
        for release in list(self._releases.values()):
            release()

    def process_request_received(self, event: RequestReceived) -> None:
        owner = self._owner
        assert event.stream_id is not None
        if not owner.guard.streams.take(owner.caller.uid):
            owner.refuse_stream(
                event.stream_id,
                _Refusal("too_many_streams", Status.RESOURCE_EXHAUSTED, "too many open streams",
                         f"uid {owner.caller.uid} holds {owner.guard.streams.cap} open streams"),
            )
            return
        self._framing[event.stream_id] = _RequestFraming(owner.guard.limits.max_request_bytes)
        super().process_request_received(event)

    def process_data_received(self, event: DataReceived) -> None:
        assert event.stream_id is not None
        framing = self._framing.get(event.stream_id)
        if framing is None:  # not a request being read (refused, or its handler has ended)
            super().process_data_received(event)
            return
        refusal = framing.feed(event.data or b"")
        if refusal is not None:
            self._end_request(event.stream_id, refusal)
            # The stream is closed now, so this gives the bytes back to the connection's window alone.
            self.connection.ack(event.stream_id, event.flow_controlled_length or 0)
            return
        super().process_data_received(event)
        if framing.messages:
            self._owner.request_complete()

    def process_stream_ended(self, event: StreamEnded) -> None:
        assert event.stream_id is not None
        framing = self._framing.get(event.stream_id)
        if framing is not None and framing.mid_message:
            self._end_request(
                event.stream_id,
                _Refusal("request_incomplete", Status.INVALID_ARGUMENT, "request message incomplete",
                         "the request ended inside a message"),
            )
        elif framing is not None:
            self._owner.request_complete()
        super().process_stream_ended(event)

    def process_stream_reset(self, event: StreamReset) -> None:
        super().process_stream_reset(event)
        assert event.stream_id is not None
        self._release(event.stream_id)

    def _end_request(self, stream_id: int, refusal: _Refusal) -> None:
        self._owner.refuse_stream(stream_id, refusal)
        stream = self.streams.get(stream_id)
        if stream is not None:
            # What grpclib does when the caller resets a stream.
            stream.__terminated__(refusal.public)
            self.handler.cancel(stream)
        self._release(stream_id)

    def _release(self, stream_id: int) -> None:
        release = self._releases.get(stream_id)
        if release is not None:
            release()


class _RequestFraming:
    """Where one request stands in gRPC's framing: a 5-byte prefix (flag, length), then the message."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._prefix = bytearray()
        self._remaining: int | None = None  # bytes of the current message still to come; None: in a prefix
        self.messages = 0  # complete messages so far

    @property
    def mid_message(self) -> bool:
        return bool(self._prefix) or self._remaining is not None

    def feed(self, data: bytes) -> _Refusal | None:
        """Account for the stream's next bytes; the refusal if they make the request unacceptable."""
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._remaining is None:
                take = min(5 - len(self._prefix), len(view) - position)
                self._prefix += view[position : position + take]
                position += take
                if len(self._prefix) < 5:
                    break
                flag, length = self._prefix[0], int.from_bytes(self._prefix[1:5], "big")
                self._prefix.clear()
                if flag == 1:
                    return _Refusal("request_compressed", Status.UNIMPLEMENTED, "compressed requests are not supported",
                                    "the request message is compressed")
                if flag != 0:
                    return _Refusal("request_malformed", Status.INVALID_ARGUMENT, "malformed request message",
                                    f"message flag {flag}")
                if length > self._max_bytes:
                    return _Refusal("request_too_large", Status.INVALID_ARGUMENT, "request message too large",
                                    f"a request message of {length} bytes, more than {self._max_bytes}")
                self._remaining = length
            take = min(self._remaining, len(view) - position)
            self._remaining -= take
            position += take
            if self._remaining == 0:
                self._remaining = None
                self.messages += 1
        return None


def _h2_connection(connection: Connection) -> H2Connection:
    # grpclib's Connection has no public accessor for its h2 connection: this is the one place that reads it.
    h2: H2Connection = connection._connection
    return h2
