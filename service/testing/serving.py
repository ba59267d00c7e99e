"""What the fake FCM and APNs servers share: listening, stopping like a crash, holding answers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from collections.abc import Callable


class Listener:
    """A loopback TCP server whose answers a test can hold back and release from any thread."""

    host: str
    port: int

    def _init_listener(self) -> None:
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @property
    def connections(self) -> int:
        """How many clients are connected now."""
        return len(self._writers)

    async def _listen(self, context: ssl.SSLContext | None = None) -> None:
        """Listen (again on the same port after a stop)."""
        self._loop = asyncio.get_running_loop()
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection, like a crashed server."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def hold(self) -> None:
        """Keep answers back until release(); safe to call from any thread."""
        self._call(lambda: self._gate().clear())

    def release(self) -> None:
        """Answer the held requests and those to come."""
        self._call(lambda: self._gate().set())

    def _gate(self) -> asyncio.Event:
        assert self._open is not None, "start() first"
        return self._open

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        assert loop is not None, "start() first"
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            fn()
            done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(timeout=10)
