"""The series the processes export on a healthy stack, as a fixture the rule tests are held to.

`compose/prometheus/tests/exported_series.yml` is written from a live scrape (tests/
test_prometheus_live.py, with GPTOSS_WRITE_SERIES_FIXTURE=1): per Prometheus job, every `gptoss_`
series a healthy stack exports after one finished job and before any failure. A rule test may feed
only those series (tests/test_prometheus.py), so it cannot hide, say, a failure counter that a
process only creates at its first failure.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "compose" / "prometheus" / "tests" / "exported_series.yml"

FREE_VALUES = {"model", "device"}
"""Labels whose values depend on the deployment (the model served, the device): any value matches."""

NOT_EXPORTED = {"instance", "job", "cluster", "region", "exported_instance"}
"""Labels Prometheus adds (target and external labels), which the comparison leaves out."""

HEADER = """\
# Written by tests/test_prometheus_live.py (GPTOSS_WRITE_SERIES_FIXTURE=1) from a live scrape: per
# Prometheus job, every gptoss_ series a healthy stack exports after one finished job and before any
# failure (labels Prometheus adds left out; model and device, which depend on the deployment, as *).
# The promtool tests may feed only these series (tests/test_prometheus.py checks).
"""

SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse(series: str) -> tuple[str, dict[str, str]]:
    """`name{a="x",b="y"}` as its name and labels."""
    match = SERIES.match(series.strip())
    if not match:
        raise ValueError(f"not a series: {series}")
    labels = dict(LABEL.findall(match[2] or ""))
    return match[1], labels


def key(name: str, labels: dict[str, str]) -> str:
    """A series as the fixture writes it: sorted labels, deployment-dependent values as *."""
    kept = {}
    for label, value in labels.items():
        if label in NOT_EXPORTED:
            continue
        if label in FREE_VALUES:
            value = "*"
        elif label == "le":
            value = floatToGoString(float(value))
        kept[label] = value
    inside = ",".join(f'{label}="{value}"' for label, value in sorted(kept.items()))
    return f"{name}{{{inside}}}" if inside else name


def scraped(text: str) -> set[str]:
    """The gptoss_ series of one /metrics answer (Prometheus text format), as keys."""
    found = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gptoss_") and not sample.name.endswith("_created"):
                found.add(key(sample.name, dict(sample.labels)))
    return found


def load() -> dict[str, set[str]]:
    """The fixture: Prometheus job name -> series keys."""
    return {job: set(series) for job, series in yaml.safe_load(FIXTURE.read_text()).items()}


def write(series: dict[str, set[str]]) -> None:
    FIXTURE.write_text(
        HEADER + yaml.safe_dump({job: sorted(s) for job, s in sorted(series.items())}, width=200)
    )


def unexported(test_file: Path, exported: dict[str, set[str]]) -> list[str]:
    """Every gptoss_ series a promtool test file feeds that its job's processes do not export."""
    missing = []
    for test in yaml.safe_load(test_file.read_text())["tests"]:
        for entry in test.get("input_series", []):
            name, labels = parse(entry["series"])
            if not name.startswith("gptoss_"):
                continue  # `up` and the like come from Prometheus itself
            job = labels.get("job", "")
            if key(name, labels) not in exported.get(job, set()):
                missing.append(f"{test['name']}: {entry['series']}")
    return missing
