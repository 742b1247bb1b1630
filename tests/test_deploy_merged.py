"""Deployment checks that need other branches of this round (run them after the merge).

- ``hapax config push FILE --etcd URL --cluster NAME`` (issue [6]/9, node/config_cli.py): the
  compose file's config-push service and the chart's hook Job run it;
- ``server.http3`` in the config (issue [11]): the chart writes it with ``http3.enabled``.

Until both are merged these fail with the CLI's or the config's own complaint, which is the point:
the deployment files name those commands and keys, and must agree with them.
"""

from __future__ import annotations

from pathlib import Path

from tests.deploy_support import CHART
from tests.test_deploy_consistency import (
    VALUE_FILES,
    chart,
    chart_config_as_hapax_loads_it,
    compose,
    parses,
    pod,
    values,
)


def test_every_config_push_command_is_one_the_cli_accepts() -> None:
    commands = {"compose config-push": compose()["services"]["config-push"]["command"]}
    for files in VALUE_FILES:
        commands[f"chart Job {files}"] = pod(chart(files), "Job", "hapax-config-push")["containers"][0]["args"]
    for where, argv in commands.items():
        args = parses(argv)
        assert argv[:2] == ["config", "push"], where
        assert getattr(args, "cluster", None) in (values()["clusterName"], "$(HAPAX_CLUSTER)"), where
        assert getattr(args, "etcd", None), where


def test_the_chart_config_with_http3_is_one_hapax_accepts(tmp_path: Path) -> None:
    cfg = chart_config_as_hapax_loads_it([CHART / "ci" / "http3-values.yaml"], tmp_path)
    h3 = cfg.server.model_dump()["http3"]
    assert h3["enabled"] is True
    assert h3["port"] == cfg.server.port
    assert (h3["certificate_file"], h3["key_file"]) == ("/etc/hapax/tls/tls.crt", "/etc/hapax/tls/tls.key")
