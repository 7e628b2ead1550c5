"""deploy/monitoring/grafana-dashboard.json: every query asks for metrics, and labels, the service
exports; the cluster-wide online counters are aggregated with max, never summed across pods."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqsa.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(out) > 15
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name a service's /metrics can hold, with its label names (one of each metric
    set, so that every family has a sample)."""
    m = Metrics()
    m.requests.labels(route="/recommend", method="POST", status="200").observe(0.001)
    m.stage.labels(stage="encoder").observe(0.001)
    m.fallbacks.labels(reason="no_usable_history").inc()
    m.events.labels(outcome="accepted").inc()
    m.feedback_dropped.labels(what="impressions").inc()
    m.redis_memory.set(0.5)
    m.archive_backlog.set(3)
    m.set_model("3f9a0c1d2b4e5f60")
    totals = {f"3f9a0c1d2b4e5f60|served|{n}": 1 for n in ("impressions", "clicks", "hits", "conversions")}
    m.online.update({**totals, "3f9a0c1d2b4e5f60|served|fallback:no_usable_history": 1, "events|click": 1})
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mqsa_[a-z_]+)\b", expr))


def test_every_query_names_an_exported_metric(queries, exported) -> None:
    used = set().union(*map(metric_names, queries))
    assert used, "no mqsa metric in the queries"
    assert used - set(exported) == set()
    online = {n for n in exported if n.startswith("mqsa_online_") and n.endswith("_total")}
    assert online <= used, "an online counter has no panel"


def test_every_label_a_query_names_is_exported(queries, exported) -> None:
    for expr in queries:
        labels = set().union(*(exported[n] for n in metric_names(expr)))
        labels |= {"le"} if "_bucket" in expr else set()
        grouped = re.findall(r"\bby \(([^)]*)\)", expr)
        selected = re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr)
        named = {w.strip() for g in grouped for w in g.split(",")} | set(selected)
        named |= set(re.findall(r"label_values\([a-z_]+, ([a-z_]+)\)", expr))
        assert named - labels - PROMQL_WORDS == set(), expr


def test_the_online_counters_are_never_summed_across_pods(queries) -> None:
    """Every pod exports the same cluster-wide totals: max by (model_version, mode), not sum."""
    summed = re.compile(r"\b(sum|avg)\s*(by\s*\([^)]*\)\s*)?\(\s*(rate|increase|irate)\(mqsa_online_")
    for expr in queries:
        assert not summed.search(expr), expr
        if "mqsa_online_" in expr and "label_values" not in expr:
            assert "max by (" in expr, expr


def test_the_queries_are_balanced_and_use_known_variables(dashboard, queries) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in queries:
        stack = []
        for c in expr:
            if c in "([{":
                stack.append(c)
            elif c in ")]}":
                assert stack and "([{"[")]}".index(c)] == stack.pop(), expr
        assert not stack, expr
        used = set(re.findall(r"\$(\w+)", expr))
        assert {v for v in used if not v.startswith("__")} <= variables, expr


def test_the_panels_are_laid_out_without_overlap(dashboard) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and p["description"], p["title"]
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
