"""A tiny TCP/Unix-socket forwarder, the one link between the host and the node's namespace.

    python forward.py LISTEN=TARGET [LISTEN=TARGET ...]

with LISTEN and TARGET each `tcp:HOST:PORT` or `unix:PATH`. Unix sockets are files, so a
pair of forwarders (one on each side, meeting at a socket in the work directory) carries
a TCP port from the host into the private network namespace, or out of it, without any
change to the host's network. Standalone (no imports from the harness): it runs in both.
"""

from __future__ import annotations

import asyncio
import os
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()


async def _connect(target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, rest = target.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(rest)
    host, _, port = rest.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _serve(listen: str, target: str) -> asyncio.AbstractServer:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await _connect(target)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, tw), _pipe(tr, w))
        tw.close()
        w.close()

    kind, _, rest = listen.partition(":")
    if kind == "unix":
        if os.path.exists(rest):
            os.unlink(rest)
        return await asyncio.start_unix_server(handle, rest)
    host, _, port = rest.rpartition(":")
    return await asyncio.start_server(handle, host, int(port), reuse_address=True)


async def main(specs: list[str]) -> None:
    servers = [await _serve(*s.split("=", 1)) for s in specs]
    print("forwarding " + " ".join(specs), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
