"""The PrometheusRule of deploy/k8s/monitoring, written from deploy/prometheus/alerts.yml.

One source for the rules: the PrometheusRule's ``spec`` is alerts.yml's text, indented, so the
operator's Prometheus and compose's load the very same rules, and ``promtool test rules``
(alerts.test.yml) covers both. ``test_monitoring.py`` fails when the file is stale; rewrite it
with ``.venv/bin/python -m tests.deploy.prometheus_rule``.
"""

from __future__ import annotations

import textwrap

from tests.deploy.promql import ALERTS, DEPLOY

PROMETHEUS_RULE = DEPLOY / "k8s" / "monitoring" / "prometheus-rule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `.venv/bin/python -m tests.deploy.prometheus_rule`:
# edit alerts.yml (and its unit tests, alerts.test.yml), then rerun; tests/deploy fails while the
# two differ. Add the labels your Prometheus's ruleSelector wants (kube-prometheus-stack:
# release: <name>).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sms-bridge
  namespace: smsbridge
  labels:
    app.kubernetes.io/name: sms-bridge
    app.kubernetes.io/part-of: sms-bridge
spec:
"""


def render() -> str:
    """The PrometheusRule whose ``spec`` is alerts.yml from its ``groups:`` line on."""
    text = ALERTS.read_text()
    rules = text[text.index("\ngroups:") + 1 :]
    return HEADER + textwrap.indent(rules, "  ", lambda line: bool(line.strip()))


def main() -> None:
    PROMETHEUS_RULE.write_text(render())
    print(f"wrote {PROMETHEUS_RULE.relative_to(DEPLOY.parent)}")


if __name__ == "__main__":
    main()
