"""Read timeouts: how long the server waits for a client that has stopped sending (QAAS_READ_TIMEOUT_S).

uvicorn (0.55, h11 and httptools alike) bounds none of it: it arms its keep-alive timer only after a response,
and cancels it on any byte received. A connection that sends nothing, a request line and headers sent a byte at
a time, or a body that stops half-way would each hold a connection (and for an upload, a temporary file) for
as long as the client likes. Two pieces bound them:

- `TimedH11Protocol`, uvicorn's h11 protocol with one more timer: a request's line and headers must arrive in
  full within the timeout from the connection's opening (or from the first byte of the next request on a
  kept-alive one), however they trickle in; otherwise the connection is closed. The same timer closes a
  connection whose client goes on sending a body nobody reads any more (after an early answer such as a 401).
- `ReadTimeoutMiddleware`, for the body: while the app reads it, each chunk must come within the timeout.
  When one does not, the app is told the client went away (`http.disconnect`: an upload deletes its temporary
  file), and the client gets 408 `request_timeout` and a closed connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.core.config import get_settings

log = logging.getLogger("qaas.api")

REQUEST_TIMEOUT = "request_timeout"


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; closes a connection whose request line and headers are not all there within
    QAAS_READ_TIMEOUT_S."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = get_settings().read_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request is in the app's hands: the body has ReadTimeoutMiddleware
        elif self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            self._arm()  # part of a request head, or a body nobody reads: not re-armed by more bytes
        # else: a complete request was answered and nothing is pending; uvicorn's keep-alive timer runs.

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _timed_out(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no complete request in %.0f s (QAAS_READ_TIMEOUT_S)",
                self.client[0] if self.client else "unknown",
                self.read_timeout_s,
            )
            self.transport.close()


class ReadTimeoutMiddleware:
    """While the app reads a request body, each chunk must arrive within QAAS_READ_TIMEOUT_S; otherwise 408."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout_s = get_settings().read_timeout_s
        body_done = False
        timed_out = False
        response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:  # later calls wait for a disconnect (StreamingResponse): no bound on those
                return await receive()
            if timed_out:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except TimeoutError:
                timed_out = True
                log.info(
                    "%s %s: the request body stalled for %.0f s (QAAS_READ_TIMEOUT_S): answering 408",
                    scope["method"],
                    scope["path"],
                    timeout_s,
                )
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out and not response_started:
                return  # the app's answer to a "disconnect"; the client gets the 408 below
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out or response_started:
                raise
            log.debug("the app failed after a read timeout", exc_info=True)
        if timed_out and not response_started:
            await _send_408(send, timeout_s)


async def _send_408(send: Send, timeout_s: float) -> None:
    body = json.dumps(
        {
            "error": REQUEST_TIMEOUT,
            "detail": f"the request body stopped arriving: nothing came for {timeout_s:.0f} s "
            "(QAAS_READ_TIMEOUT_S); send the request again",
        }
    ).encode()
    # Connection: close, or h11 would keep the connection for a next request behind the unread rest of this one.
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 408, "headers": headers})
    await send({"type": "http.response.body", "body": body})
