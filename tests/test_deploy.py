"""Shipped monitoring: Prometheus rules, Alertmanager routing and Grafana dashboards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD_UIDS = {"requiem-api", "requiem-engine", "requiem-cas", "requiem-audit"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing; .ci/run installs it")
    pytest.skip(f"{name} not installed (Debian: prometheus / prometheus-alertmanager)")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


def test_alert_rules_are_valid():
    result = _run(
        _tool("promtool"),
        "check",
        "rules",
        str(DEPLOY / "prometheus" / "requiem-rules.yml"),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_alert_rules_fire_on_their_signals_and_not_otherwise():
    """promtool's unit tests feed series to every alert and check what fires."""
    result = _run(
        _tool("promtool"),
        "test",
        "rules",
        str(DEPLOY / "prometheus" / "requiem-rules.test.yml"),
    )

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("severity", "receivers"),
    [
        ("P0", "p0-page,slack-alerts-p0,slack-alerts-p1,p2-email-slack"),
        ("P1", "slack-alerts-p1,p1-page,p2-email-slack"),
        ("P2", "p2-email-slack"),
    ],
)
def test_alert_routing_follows_the_runbook(severity, receivers):
    config = str(DEPLOY / "alertmanager" / "alertmanager.yml")
    amtool = _tool("amtool")

    checked = _run(amtool, "check-config", config)
    routed = _run(
        amtool,
        "config",
        "routes",
        "test",
        f"--config.file={config}",
        f"severity={severity}",
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert routed.stdout.strip() == receivers


def test_dashboards_carry_the_runbook_uids():
    found = {}
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        found[board["uid"]] = path.stem

    assert set(found) == DASHBOARD_UIDS
    assert all(uid == stem for uid, stem in found.items())


def test_every_dashboard_and_alert_metric_is_exported_by_the_product(home):
    """No panel or alert watches a metric name the product never exports."""
    from prometheus_client import REGISTRY

    from requiem import settings
    from requiem.api.app import create_app

    create_app(settings.load())  # installs the scrape-time collectors too
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = set()
    for family in REGISTRY.collect():
        exported.add(family.name)
        exported.update(family.name + s for s in suffixes.get(family.type, ()))
    texts = [p.read_text() for p in (DEPLOY / "grafana").glob("*.json")]
    texts.append((DEPLOY / "prometheus" / "requiem-rules.yml").read_text())
    used = set()
    for text in texts:
        used.update(re.findall(r"\brequiem_[a-z0-9_]+", text))

    assert used - exported == set()
