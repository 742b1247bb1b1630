"""``hapax config validate --probe``: call every provider once before any traffic does.

Each provider is built exactly as ``serve`` builds it and asked for its cheap
probe (list models, no tokens) in strict mode, so a wrong ``base_url`` (the
API is not at that path: a missing ``/v1``), a refused credential or an
unreachable host is reported now, one line per provider, rather than as the
first user's 404 or 502. Providers are probed concurrently; each one within
``timeout``.
"""

from __future__ import annotations

import asyncio

from hapax import MISCONFIGURED, Config, UpstreamError
from hapax.providers import build_provider

from .upstream import transport_factory


def probe_providers(cfg: Config, *, timeout: float) -> int:
    """Print one line per provider; 0 when all answered, 1 otherwise."""
    results = asyncio.run(_probe_all(cfg, timeout))
    failed = 0
    for name, problem in results:
        if problem is None:
            print(f"provider {name}: ok")
        else:
            failed += 1
            print(f"provider {name}: {problem}")
    if failed:
        print(f"error: {failed} of {len(results)} providers failed the probe")
        return 1
    return 0


async def _probe_all(cfg: Config, timeout: float) -> list[tuple[str, str | None]]:
    return list(await asyncio.gather(*(_probe_one(name, cfg, timeout) for name in cfg.providers)))


async def _probe_one(name: str, cfg: Config, timeout: float) -> tuple[str, str | None]:
    pcfg = cfg.providers[name]
    provider = build_provider(name, pcfg, transport_factory(name, pcfg))
    try:
        await asyncio.wait_for(provider.probe(timeout=timeout, strict=True), timeout + 1)
    except UpstreamError as exc:
        kind = "misconfigured" if exc.code == MISCONFIGURED else "unreachable"
        if exc.code == "upstream_auth_failed":
            kind = "credentials refused"
        return name, f"{kind}: {exc.message}"
    except TimeoutError:
        return name, f"unreachable: no answer within {timeout:g}s"
    finally:
        await provider.aclose()
    return name, None
