"""The aiohttp-backed ``Transport``: one pooled keep-alive session per provider.

aiohttp's exceptions are translated here, at the seam, into ``hapax``'s
transport errors, choosing the most specific match. What it shares with the
lean ``node.http1`` transport (keep-alive, deadlines, timeout errors, the
response base) comes from there, so the two fail alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from hapax import (
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    ReadError,
    Transport,
    TransportError,
    UpstreamRequest,
    UpstreamResponse,
)
from hapax.config import ProviderConfig, Timeouts

from .http1 import (
    KEEPALIVE_SECONDS,
    Http1Transport,
    TimedResponse,
    deadlines,
    first_byte_timeout,
    idle_timeout,
    total_timeout,
)


def _translate(exc: BaseException) -> TransportError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(str(exc) or "connect timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return FirstByteTimeout(str(exc) or "timed out")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return ReadError(str(exc) or type(exc).__name__)
    if isinstance(exc, aiohttp.ClientResponseError):
        return ReadError(f"malformed response: {exc.message}")
    return ReadError(f"{type(exc).__name__}: {exc}")


class AiohttpResponse(TimedResponse):
    def __init__(self, resp: aiohttp.ClientResponse, *, deadline: float, idle: float) -> None:
        super().__init__(resp.status, resp.headers, deadline=deadline, idle=idle)
        self._resp = resp
        self._complete = False

    async def read(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._deadline):
                data = await self._resp.read()
        except TimeoutError:
            raise total_timeout() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        self._complete = True
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        content = self._resp.content
        try:
            async with asyncio.timeout(None) as cm:
                while True:
                    cm.reschedule(self._chunk_deadline(now=loop.time()))
                    chunk = await content.readany()
                    if not chunk:
                        break
                    if loop.time() >= self._deadline:
                        # Data already buffered returns at once, whatever the timer says.
                        raise total_timeout()
                    yield chunk
        except TimeoutError:
            raise idle_timeout() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        self._complete = True

    def close(self) -> None:
        # A fully read body returns the connection to the pool; anything else drops it.
        if self._complete:
            self._resp.release()
        else:
            self._resp.close()


class AiohttpTransport(Transport):
    def __init__(self, config: ProviderConfig) -> None:
        self._limit = config.pool_size
        self._session: aiohttp.ClientSession | None = None
        self._client_timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit,
                keepalive_timeout=KEEPALIVE_SECONDS,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
                auto_decompress=True,
            )
        return self._session

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        session = self._get_session()
        loop = asyncio.get_running_loop()
        t = request.timeouts
        deadline, head_deadline = deadlines(t, now=loop.time())
        timeout = self._client_timeouts.get(t)
        if timeout is None:
            timeout = self._client_timeouts[t] = aiohttp.ClientTimeout(
                total=None, sock_connect=t.connect, connect=t.connect
            )
        try:
            async with asyncio.timeout_at(head_deadline):
                resp = await session.request(
                    request.method,
                    request.url,
                    headers=dict(request.headers),
                    data=request.body,
                    timeout=timeout,
                    allow_redirects=False,
                )
        except TimeoutError:
            raise first_byte_timeout() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        return AiohttpResponse(resp, deadline=deadline, idle=t.stream_idle)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def transport_factory(name: str, config: ProviderConfig) -> Transport:
    return Http1Transport(config)
