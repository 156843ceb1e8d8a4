"""A TCP proxy on loopback that holds every chunk from the client for a fixed time: a store across a network, for
`benchmarks/store_lookup_step.py` and the slow-store integration test. Runs in a process of its own (spawned), so
its event loop shares no GIL with what it measures; Python's asyncio adds ~1 ms a round trip of its own."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import time
from collections.abc import Iterator


def _serve(listen: int, upstream: int, delay_s: float) -> None:
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw, delay_s), pump(ur, cw, 0.0), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def delayed(upstream: int, delay_s: float, timeout_s: float = 20.0) -> Iterator[int]:
    """A proxy to loopback port `upstream` adding `delay_s` to each request; yields the port it listens on."""
    if delay_s < 0:
        raise ValueError(f"a delay cannot be negative: {delay_s}")
    port = _free_port()
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, upstream, delay_s), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or not proc.is_alive():
                    raise TimeoutError(f"the delay proxy did not listen on port {port}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.join(10)
