"""The alert rules (deploy/prometheus/alerts.yml): valid for Prometheus, each one fired and
cleared by a ``promtool test rules`` case, shipped alike to compose and the chart, and
documented with its threshold.

The promtool tests skip only where promtool is not installed (Debian: ``apt-get install
prometheus``); ``.ci/run`` installs it, so in CI they run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

ROOT: Final = Path(__file__).resolve().parents[2]
RULES: Final = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS: Final = ROOT / "deploy" / "prometheus" / "tests"
CHART_COPY: Final = ROOT / "helm" / "tagstream" / "files" / "alerts.yml"
PROMETHEUS_CONFIG: Final = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE: Final = ROOT / "docker-compose.yml"
README: Final = ROOT / "README.md"
MOUNTED_AT: Final = "/etc/prometheus/alerts.yml"
# promtool evaluates hours of synthetic series in well under a second; a minute only trips
# on a hung process.
PROMTOOL_TIMEOUT_S: Final = 60
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _alert_names() -> list[str]:
    return [rule["alert"] for rule in _rules() if "alert" in rule]


def _rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS.glob("*.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def test_the_issue_alerts_are_all_there() -> None:
    assert set(_alert_names()) == {
        "TagstreamConsumerLagGrowing",
        "TagstreamConsumerLagSeconds",
        "TagstreamDeadLetterRateHigh",
        "TagstreamNoProgress",
        "TagstreamNotReady",
        "TagstreamCircuitOpen",
    }
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_promtool_unit_tests_pass() -> None:
    files = _rule_test_files()
    assert files
    result = _promtool("test", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_fired_and_cleared_by_a_unit_test() -> None:
    fired: set[str] = set()
    cleared: set[str] = set()
    for path in _rule_test_files():
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            checks = case.get("alert_rule_test", [])
            for check in checks:
                name = check["alertname"]
                if check.get("exp_alerts"):
                    fired.add(name)
                    firing_at = check["eval_time"]
                    later = [
                        other
                        for other in checks
                        if other["alertname"] == name
                        and not other.get("exp_alerts")
                        and _seconds(other["eval_time"]) > _seconds(firing_at)
                    ]
                    if later:
                        cleared.add(name)
    assert sorted(set(_alert_names()) - fired) == []
    assert sorted(set(_alert_names()) - cleared) == []


def _seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[unit] for n, unit in re.findall(r"(\d+)([hms])", duration))


def test_the_chart_ships_the_same_rules_file() -> None:
    assert CHART_COPY.read_bytes() == RULES.read_bytes(), (
        "copy deploy/prometheus/alerts.yml to helm/tagstream/files/alerts.yml"
    )


def test_the_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert MOUNTED_AT in config["rule_files"]
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    prometheus = compose["services"]["prometheus"]
    assert "monitoring" in prometheus["profiles"]
    assert f"./deploy/prometheus/alerts.yml:{MOUNTED_AT}:ro" in prometheus["volumes"]


def test_every_alert_and_its_threshold_is_documented() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("### Alerts", 1)[1].split("\n## ", 1)[0]
    for rule in _rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
        assert f"`{rule['for']}`" in section, rule["alert"]
