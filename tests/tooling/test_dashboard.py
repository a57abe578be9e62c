"""The Grafana dashboard queries only metrics the worker exposes, and is provisionable."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support.observability import new_metrics, record_everything, samples

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tagstream-dashboard.json"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"
METRIC_NAME = re.compile(r"\btagstream_[a-zA-Z0-9_]+")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    parsed = orjson.loads(DASHBOARD.read_bytes())
    assert isinstance(parsed, dict)
    return parsed


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel ``expr`` and variable queries."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key in ("expr", "definition") and isinstance(child, str):
                yield child
            elif key == "query" and isinstance(child, str | dict):
                text = child if isinstance(child, str) else child.get("query", "")
                if isinstance(text, str) and "tagstream_" in text:
                    yield text
            else:
                yield from _queries(child)
    elif isinstance(node, list):
        for child in node:
            yield from _queries(child)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_every_metric_the_dashboard_queries_exists_in_the_exposition(
    dashboard: dict[str, Any],
) -> None:
    queried = {name for query in _queries(dashboard) for name in METRIC_NAME.findall(query)}
    metrics = new_metrics()
    record_everything(metrics)
    exposed = {name for name, _ in samples(metrics)}
    assert len(queried) >= 15
    assert sorted(queried - exposed) == []


def test_the_dashboard_covers_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    text = "\n".join(_queries(dashboard))
    for needle in (
        "rate(tagstream_events_consumed_total",
        "sum by (stage) (rate(tagstream_events_dead_lettered_total",
        "tagstream_consumer_lag_messages",
        "tagstream_consumer_lag_seconds",
        "tagstream_batch_fill_ratio",
        "histogram_quantile(0.5, sum by (le) (rate(tagstream_inference_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(tagstream_inference_seconds_bucket",
        "tagstream_in_flight_batches",
        "tagstream_paused_partitions",
    ):
        assert needle in text, needle


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panel_ids_are_unique_and_panels_fit_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_histogram_quantiles_aggregate_buckets_by_le(dashboard: dict[str, Any]) -> None:
    quantiles = [query for query in _queries(dashboard) if "histogram_quantile" in query]
    assert quantiles
    for query in quantiles:
        assert "sum by (le)" in query and "_bucket{" in query, query


def test_the_provisioning_provider_points_where_the_dashboard_is_mounted() -> None:
    (provider_file,) = sorted(PROVISIONING.glob("*.y*ml"))
    config = yaml.safe_load(provider_file.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/tagstream"
