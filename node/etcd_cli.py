"""What every CLI command that talks to a cluster's etcd shares: its flags and the config they make.

``hapax keys`` (with ``--etcd``), ``hapax config push|get|diff|history|rollback`` and
``hapax cluster status|reload`` take the same ``--etcd`` and ``--cluster`` flags,
with the same environment fallbacks as ``hapax serve``.
"""

from __future__ import annotations

import argparse
import os

from hapax import default_config, load_config
from hapax.config import Config


def etcd_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", metavar="URL[,URL...]",
                   help="the cluster's etcd (cluster.etcd.endpoints; env HAPAX_ETCD_ENDPOINTS)")
    p.add_argument("--cluster", metavar="NAME", help="the cluster's name (state.cluster; env HAPAX_CLUSTER)")


def cli_config(args: argparse.Namespace) -> Config:
    """``--config`` (without its secrets) with ``--etcd``/``--cluster`` or their environment applied."""
    from .cli import with_state_overrides

    # No secrets needed here: an unset ${HAPAX_ADMIN_KEY} is left out, not an error.
    path = getattr(args, "config", None)
    cfg = load_config(path, require_env=False) if path else default_config()
    return with_state_overrides(cfg, redis=None, cluster=getattr(args, "cluster", None), env=os.environ,
                                etcd=getattr(args, "etcd", None))
