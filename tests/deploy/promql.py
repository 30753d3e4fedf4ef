"""Metric names in PromQL expressions, and the queries of the shipped dashboards and rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"

# Functions, aggregations and keywords of PromQL that the shipped queries use or may use.
PROMQL_WORDS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "predict_linear",
        "changes",
        "resets",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "histogram_quantile",
        "time",
        "vector",
        "scalar",
        "abs",
        "ceil",
        "floor",
        "round",
        "clamp",
        "clamp_min",
        "clamp_max",
        "absent",
        "absent_over_time",
        "label_replace",
        "label_join",
        "sort",
        "sort_desc",
        "timestamp",
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label names, functions and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    tokens = re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text)
    return {token for token in tokens if token not in PROMQL_WORDS}


def rule_expressions() -> Iterator[tuple[str, str]]:
    """(alert name, expression) of every rule in alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule.get("record"), rule["expr"]


def dashboard_panels() -> Iterator[tuple[str, dict[str, Any]]]:
    """(dashboard file, panel) for every panel with queries, rows' nested panels included."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        stack = list(dashboard["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            if panel.get("targets"):
                yield path.name, panel


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query of every dashboard."""
    for _, panel in dashboard_panels():
        for target in panel["targets"]:
            yield panel["title"], target["expr"]
