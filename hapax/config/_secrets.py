"""Provider credentials kept in files (``providers.<name>.api_key_file``).

Theory of operation: a config names the file, not the secret, so the config can
live in etcd or a ConfigMap while the credential stays in a mounted Secret. The
file is read when the node starts, on every config change, and on a reload
(SIGHUP, ``hapax cluster reload``); the runtime builds each provider with the
key read last (``hapax.routing._runtime``). Reading is I/O: the node calls this
off the event loop.

At start a file that cannot be read is an error, as a bad config is. Later,
a provider keeps the key it had (a Secret being swapped, a brief unmount must
not take a working provider down) and the problem is reported for the log.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import SecretStr

from .._errors import ConfigError
from ._config import Config

Secrets = Mapping[str, SecretStr]


def read_api_key_files(
    config: Config, *, previous: Secrets | None = None
) -> tuple[dict[str, SecretStr], list[tuple[str, str]]]:
    """``{provider: key}`` for every provider with ``api_key_file``, and the (path, problem)
    pairs of files that could not be read. With ``previous`` (a reload) a failed file keeps
    the key read before; without (start-up) it raises ``ConfigError``."""
    out: dict[str, SecretStr] = {}
    problems: list[tuple[str, str]] = []
    for name, p in config.providers.items():
        if p.api_key_file is None:
            continue
        where = f"providers.{name}.api_key_file"
        try:
            with open(p.api_key_file, "rb") as f:
                text = f.read(64 * 1024).decode().strip()  # a trailing newline is not part of a key
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            problems.append((where, f"cannot read {p.api_key_file}: {why}"))
            text = ""
        else:
            if not text:
                problems.append((where, f"{p.api_key_file} is empty"))
        if text:
            out[name] = SecretStr(text)
        elif previous is not None and name in previous:
            out[name] = previous[name]
    if problems and previous is None:
        raise ConfigError("cannot read a provider's api_key_file", problems=problems)
    return out, problems
