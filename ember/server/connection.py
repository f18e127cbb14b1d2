"""The HTTP connection: uvicorn's h11 protocol plus a deadline for a request's head.

uvicorn closes a connection left idle between requests (timeout_keep_alive), but it arms no timer on a new
connection, and any byte received cancels its timer: a client that connects and sends nothing, or half a
request line and then nothing, would hold its connection (and a file descriptor) forever. Here such a
connection must complete the head within `header_timeout` seconds or is closed. The body then has its own
deadline (see body.py); a connection idle between requests is uvicorn's to close, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._update_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        """A head has begun (or the connection is new) and is not complete yet."""
        if self.cycle is None:
            return True
        if not self.cycle.response_complete:
            return False  # a request is being served
        # Between requests: bytes of the next head are buffered, or an unread body is still arriving.
        return self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])

    def _update_timer(self) -> None:
        if not self._waiting_for_head():
            self._disarm()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._deadline)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _deadline(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()
