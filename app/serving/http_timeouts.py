"""Read timeouts for slow clients, in the HTTP protocol uvicorn runs (h11).

uvicorn has no timeout on receiving a request: `timeout_keep_alive` covers only the idle time between two
requests and restarts on every byte, so a client sending one byte a second holds its connection for ever. ASGI
middleware cannot bound the headers (the app is called once they are complete), so the protocol is subclassed:
one deadline for the headers, counted from the connection's start or the previous response's end, and one for the
body, counted from the end of the headers. Bytes arriving never extend a deadline. Past the header deadline the
connection is closed; past the body deadline the client is answered 408 and the connection closed, and the app
sees a client disconnect. Nothing is timed while the app computes its answer.

The server therefore always runs h11, the protocol its pinned dependencies install; uvicorn's `auto` would pick
httptools where that is installed (faster, but without these timeouts).
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE_EMPTY = [(b"content-length", b"0"), (b"connection", b"close")]


class ReadTimeoutH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._timed_state: object = None  # the client state (h11.IDLE or h11.SEND_BODY) the timer bounds
        super().connection_made(transport)
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next request's cycle, or parse a pipelined one
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Time what the client is sending now: headers (IDLE), a body (SEND_BODY), or nothing."""
        state = self.conn.their_state
        if state is self._timed_state:
            return
        self._cancel()
        timeout = {h11.IDLE: self.header_timeout_s, h11.SEND_BODY: self.body_timeout_s}.get(state)
        if timeout is not None and not self.transport.is_closing():
            self._timer = self.loop.call_later(timeout, self._expired)
            self._timed_state = state

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timed_state = None, None

    def _expired(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.cycle.response_started:
            self.cycle.disconnected = True  # the app's own answer, if it comes, is dropped as for a gone client
            for event in (
                h11.Response(status_code=408, headers=CLOSE_EMPTY, reason=b"Request Timeout"),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        self.transport.close()


def with_read_timeouts(header_timeout_s: float, body_timeout_s: float) -> type[ReadTimeoutH11Protocol]:
    """The protocol class for `uvicorn.run(http=...)` with these timeouts."""
    attributes = {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s}
    return type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), attributes)
