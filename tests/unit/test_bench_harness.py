"""The benchmark harness's plain parts: configuration it writes, results it records, profiles it
reads. (Its processes are exercised by tests/reliability/test_chaos.py.)"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import memory
from bench.profiling import hot_spots
from bench.results import (
    README_BEGIN,
    README_END,
    Report,
    _load_latest,
    machine,
    percentile,
    record,
)
from bench.stack import (
    PROVIDER,
    TENANT,
    Sample,
    base_config,
    deep_merge,
    instance_config,
    ops_address,
    to_toml,
)
from services import SERVICES
from shared.config import Settings


def config() -> dict[str, object]:
    return base_config(
        bootstrap_servers="127.0.0.1:9092",
        optimove_url="http://127.0.0.1:8090",
        provider_url="http://127.0.0.1:8091",
    )


def test_the_written_configuration_reads_back_as_the_same_valid_settings() -> None:
    data = deep_merge(config(), {"providers": {PROVIDER: {"rate_limit_per_s": 1000.0}}})
    text = to_toml(data)

    assert tomllib.loads(text) == data
    settings = Settings(**tomllib.loads(text))
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.providers[PROVIDER].rate_limit_per_s == 1000.0
    assert settings.tenants[TENANT].optimove_base_url == f"http://127.0.0.1:8090/{TENANT}"
    # Every service answers /readyz on a port of its own.
    addresses = [ops_address(settings, service) for service in SERVICES]
    assert len(set(addresses)) == len(SERVICES)


def test_toml_quotes_what_needs_quoting() -> None:
    data = {"a-b": {'we"ird key': 'va"l\\ue\n', "list": [1, 2.5, True, {"x": "y"}]}}
    assert tomllib.loads(to_toml(data)) == data


def test_a_further_instance_gets_its_own_ports_and_state_directory(tmp_path: Path) -> None:
    base = config()
    first = instance_config(base, "sender", tmp_path / "sender", fresh_ports=False)
    second = instance_config(base, "sender", tmp_path / "sender-2", fresh_ports=True)

    assert first["sender"]["metrics_listen"] == base["sender"]["metrics_listen"]  # type: ignore[index]
    assert second["sender"]["metrics_listen"] != base["sender"]["metrics_listen"]  # type: ignore[index]
    assert first["sender"]["state_dir"] == str(tmp_path / "sender")  # type: ignore[index]
    assert second["sender"]["state_dir"] == str(tmp_path / "sender-2")  # type: ignore[index]
    assert "state_dir" not in base["sender"]  # type: ignore[operator]
    # An HTTP service's public URL follows its own listen address.
    ingress = Settings(**instance_config(base, "ingress", tmp_path / "i", fresh_ports=True))
    assert ingress.ingress.public_url == f"http://{ingress.ingress.listen}"


def test_hot_spots_count_self_and_total_samples_and_leave_out_the_wait_for_io(
    tmp_path: Path,
) -> None:
    folded = tmp_path / "x.folded"
    folded.write_text(
        "main (app.py:1);handle (/work/main/services/x/app.py:10);"
        "encode (site-packages/orjson.py:3) 6\n"
        "main (app.py:1);handle (/work/main/services/x/app.py:12) 3\n"
        "main (app.py:1);EpollSelector.select (lib/python3.11/selectors.py:468) 11\n"
    )
    spots = hot_spots(folded)

    assert (spots.samples, spots.idle) == (20, 11)
    assert spots.by_self[0] == ("encode (orjson.py)", 6)
    assert dict(spots.by_total)["handle (services/x/app.py)"] == 9
    assert dict(spots.by_total)["main (app.py)"] == 9


@pytest.mark.parametrize(
    ("share", "expected"), [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0), (0.001, 1.0)]
)
def test_percentile_is_the_nearest_rank(share: float, expected: float) -> None:
    assert percentile([float(v) for v in range(1, 101)], share) == expected


def report(name: str, figure: str, broker: str = "Apache Kafka 4.4.0") -> Report:
    return Report(
        name, [("what", figure)], "| a |", {"x": 1}, machine={**machine(), "broker": broker}
    )


def test_record_keeps_the_latest_of_each_benchmark_and_rewrites_the_readme(
    tmp_path: Path,
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold table\n{README_END}\n\n## after\n")
    results = tmp_path / "results"

    record([report("ingress", "1"), report("e2e", "2", "Tansu (memory only)")], results, readme)
    run = record([report("ingress", "3")], results, readme)

    latest = _load_latest(results / "latest.json")
    assert {name: r.summary[0][1] for name, r in latest.items()} == {"ingress": "3", "e2e": "2"}
    assert run.with_suffix(".json").exists() and run.with_suffix(".md").exists()
    text = readme.read_text()
    assert "old table" not in text
    # Each row says which broker its figure was measured on.
    assert "| ingress: what | Apache Kafka 4.4.0 | 3 |" in text
    assert "| e2e: what | Tansu (memory only) | 2 |" in text
    assert text.endswith(f"{README_END}\n\n## after\n")


def test_figures_may_have_numbers_for_keys(tmp_path: Path) -> None:
    figures = {"clients": {100: 32, 1_000: 16}}
    readme = tmp_path / "README.md"
    run = record([Report("ingress", [("w", "f")], "", figures)], tmp_path, readme)
    assert '"100": 32' in run.with_suffix(".json").read_text()


def test_a_memory_run_cut_by_its_time_budget_is_checked_over_what_was_posted() -> None:
    """400,000 of a planned 1,000,000 posted: the marks are 10/50/100% of the 400,000."""
    posted = 400_000
    mib = 2**20
    samples = [
        Sample(
            at=float(i),
            rss={"sender": 120 * mib, "reporter": (70 + (i if i > 50 else 0)) * mib},
            progress=float(i * posted // 100),
        )
        for i in range(101)
    ]
    tally = {"final": posted, "duplicates": 0}
    result = memory.report(
        posted, samples, ["sender", "reporter"], tally, 0, 3600.0, 0.0, planned=1_000_000
    )

    label, figure = result.summary[0]
    assert "400,000 recipients of a 1,000,000-recipient campaign cut by its time budget" in label
    assert result.figures["planned_recipients"] == 1_000_000
    sender = result.figures["services"]["sender"]
    assert sender["rss_mib_at"] == {"10%": 120, "50%": 120, "100%": 120}
    # The reporter grew by 50 MiB over the second half of what was posted: caught.
    reporter = result.figures["services"]["reporter"]
    assert (reporter["peak_by_50pct_mib"], reporter["peak_mib"]) == (70, 170)
    assert [f for f in result.failures if f.startswith("reporter")], result.failures
    assert not [f for f in result.failures if f.startswith("sender")]
    assert "flat: NO" in figure


def test_a_million_recipients_are_refused_for_lack_of_ram_only_on_the_memory_only_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Apache Kafka keeps the campaign on disk: 8 GiB of RAM do not stop it; Tansu needs ~18 GB."""
    gib = 2**30
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * gib)
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _: SimpleNamespace(free=50 * gib))
    assert memory.too_big(1_000_000, "kafka") is None
    refusal = memory.too_big(1_000_000, "tansu")
    assert refusal is not None and "--broker kafka" in refusal
    # Its data needs ~12 GB of disk.
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _: SimpleNamespace(free=5 * gib))
    assert "disk" in (memory.too_big(1_000_000, "kafka") or "")
