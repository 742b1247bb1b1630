"""The yardstick (DESIGN §7): a bare aiohttp + uvloop pass-through proxy, no features.

One pooled keep-alive ``ClientSession``; the ordinary ``web.Application`` with a
single catch-all route; the access log off. It copies the body and a few
headers upstream and the reply back, streaming ``text/event-stream`` replies
chunk by chunk. No auth, routing, limits, metrics, validation or logging.

    python -m bench.proxy --port 9001 --upstream http://127.0.0.1:9000 [--workers 2]

``--workers N`` runs N such processes on the one port (``SO_REUSEPORT``, as Hapax's
workers): the yardstick for how far worker processes can scale on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys

import aiohttp
from aiohttp import web

FORWARD = ("content-type", "accept", "authorization")


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60.0),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def on_cleanup(app: web.Application) -> None:
        await session["s"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k in FORWARD if (v := request.headers.get(k)) is not None}
        async with session["s"].request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            ctype = up.headers.get("content-type", "application/octet-stream")
            if ctype.startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers={"content-type": ctype})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            data = await up.read()
            return web.Response(status=up.status, body=data, headers={"content-type": ctype})

    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(host: str, port: int, upstream: str, *, reuse_port: bool = False) -> None:
    runner = web.AppRunner(make_app(upstream.rstrip("/")), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    a = p.parse_args()
    if a.workers > 1:
        _supervise(a.workers, [sys.executable, "-m", "bench.proxy", "--host", a.host, "--port", str(a.port),
                               "--upstream", a.upstream, "--reuse-port"])
        return
    import uvloop

    uvloop.run(serve(a.host, a.port, a.upstream, reuse_port=a.reuse_port))


def _supervise(n: int, argv: list[str]) -> None:
    """Run ``n`` workers until SIGTERM or SIGINT, then stop them; no restarts (a bench run is short)."""
    workers = [subprocess.Popen(argv) for _ in range(n)]

    def stop(signum: int, frame: object) -> None:
        for w in workers:
            w.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for w in workers:
        w.wait()


if __name__ == "__main__":
    main()
