"""A TCP proxy between the gateway and PostgreSQL that can slow, stall or cut.

The gateway's TXENGINE_DATABASE_URL points here; the proxy forwards every connection to
the real server. The nemesis turns its knobs:

* `delay_s`: each chunk waits this long before it is passed on (a slow network or an
  overloaded database), in both directions, order kept.
* `stall()`: nothing is passed on until `release()`, so requests inside the gateway run
  into their own timeouts.
* `cut()`: every open connection is reset, as a firewall or a failover would.

It runs in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Final

CHUNK_BYTES_MAX: Final = 64 * 1024


class SlowProxy:
    def __init__(self, *, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.delay_s = 0.0
        self.connections_total = 0
        self.chunks_total = 0  # passed on, both directions: shows traffic is flowing
        self.cuts_total = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._listen_port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            self._server = None

    def stall(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def heal(self) -> None:
        self.delay_s = 0.0
        self.release()

    def cut(self) -> int:
        """Reset every open connection (RST, not FIN); return how many."""
        writers = list(self._writers)
        for writer in writers:
            _reset(writer)
        self.cuts_total += len(writers)
        return len(writers)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _reset(writer)  # the database is down: the client sees a refused connection
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            self._writers -= {writer, up_writer}
            for end in (writer, up_writer):
                end.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES_MAX):
                await self._flowing.wait()
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                await self._flowing.wait()
                writer.write(chunk)
                self.chunks_total += 1
                await writer.drain()
        finally:
            # One side closed or broke: close the other so neither end waits forever.
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: linger 0 drops unsent data, as a broken network would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
