"""The promtool tests pin every rule: each rule is mutated in turn and `promtool test rules` must fail
on every mutant. Mutations: a threshold x2 and x0.5 (a zero threshold to 1), a quantile x2 and x0.5,
`for:` removed, doubled and halved, each label matcher negated and removed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "compose" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*_test.yml"))

THRESHOLD = re.compile(r"(==|!=|>=|<=|>|<)(\s*)(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])")
QUANTILE = re.compile(r"(histogram_quantile\(\s*)(\d*\.?\d+)")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
NEGATED = {"=": "!=", "!=": "=", "=~": "!~", "!~": "=~"}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Mutant:
    """One rule file with one change to one rule."""

    file: str
    rule: str
    change: str
    groups: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.file}: {self.rule}: {self.change}"


def scaled(number: str, factor: float) -> str:
    return f"{float(number) * factor:g}"


def expr_mutations(expr: str) -> Iterator[tuple[str, str]]:
    """(what changed, the mutated expression) for every threshold, quantile and matcher of `expr`."""
    for match in THRESHOLD.finditer(expr):
        op, space, value = match.groups()
        values = ["1"] if float(value) == 0 else [scaled(value, 2), scaled(value, 0.5)]
        for new in values:
            yield (
                f"{op} {value} -> {op} {new}",
                expr[: match.start()] + op + space + new + expr[match.end() :],
            )
    for match in QUANTILE.finditer(expr):
        for factor in (2, 0.5):
            new = scaled(match[2], factor)
            yield f"quantile {match[2]} -> {new}", expr[: match.start(2)] + new + expr[match.end(2) :]
    for match in MATCHER.finditer(expr):
        text, op = match[0], match[2]
        negated = text.replace(op, NEGATED[op], 1)
        yield f"{text} -> {negated}", expr[: match.start()] + negated + expr[match.end() :]
        yield f"{text} removed", without(expr, match.start(), match.end())


def without(expr: str, start: int, end: int) -> str:
    """`expr` without the matcher at [start, end) and the comma that joined it to a neighbour."""
    after = re.match(r"\s*,\s*", expr[end:])
    if after:
        return expr[:start] + expr[end + after.end() :]
    before = re.search(r",\s*$", expr[:start])
    if before:
        return expr[: before.start()] + expr[end:]
    return expr[:start] + expr[end:]


def seconds(duration: str) -> int:
    return sum(int(n) * UNITS[unit] for n, unit in re.findall(r"(\d+)([smhd])", duration))


def rule_mutations(rule: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what changed, the mutated rule) for every mutation of one rule."""
    for change, expr in expr_mutations(rule["expr"]):
        yield change, {**rule, "expr": expr}
    if "for" in rule:
        held = seconds(rule["for"])
        yield f"for {rule['for']} removed", {k: v for k, v in rule.items() if k != "for"}
        yield f"for {rule['for']} -> {2 * held}s", {**rule, "for": f"{2 * held}s"}
        yield f"for {rule['for']} -> {held // 2}s", {**rule, "for": f"{held // 2}s"}


def mutants() -> list[Mutant]:
    found = []
    for file in RULE_FILES:
        groups = yaml.safe_load(file.read_text())
        for g, group in enumerate(groups["groups"]):
            for r, rule in enumerate(group["rules"]):
                for change, mutated in rule_mutations(rule):
                    copied = copy.deepcopy(groups)
                    copied["groups"][g]["rules"][r] = mutated
                    name = rule.get("alert") or rule["record"]
                    found.append(Mutant(file.name, f"#{r} {name}", change, copied))
    return found


def suites_reading(rule_file: str) -> list[Path]:
    """The promtool test files that load `rule_file`."""
    return [
        t
        for t in TEST_FILES
        if any(Path(f).name == rule_file for f in yaml.safe_load(t.read_text())["rule_files"])
    ]


def promtool_passes(folder: Path, tests: list[Path]) -> bool:
    binary = shutil.which("promtool")
    assert binary, "promtool must be on PATH (Debian's prometheus package; scripts/setup installs it)"
    argv = [binary, "test", "rules", *(str(folder / "tests" / t.name) for t in tests)]
    return subprocess.run(argv, capture_output=True, timeout=300).returncode == 0


def copy_of_the_rules(folder: Path) -> None:
    """compose/prometheus's rules and tests under `folder`, so that `../rules/x.yml` resolves there."""
    shutil.copytree(PROMETHEUS / "rules", folder / "rules")
    shutil.copytree(PROMETHEUS / "tests", folder / "tests")


def survives(mutant: Mutant, folder: Path) -> bool:
    copy_of_the_rules(folder)
    (folder / "rules" / mutant.file).write_text(yaml.safe_dump(mutant.groups, sort_keys=False))
    return promtool_passes(folder, suites_reading(mutant.file))


def test_the_unmutated_rules_pass_as_the_harness_writes_them(tmp_path: Path) -> None:
    copy_of_the_rules(tmp_path)
    for file in RULE_FILES:  # rewritten through YAML, as the mutants are
        (tmp_path / "rules" / file.name).write_text(yaml.safe_dump(yaml.safe_load(file.read_text())))
    assert promtool_passes(tmp_path, TEST_FILES)


def test_the_mutations_cover_every_rule() -> None:
    changed = {(m.file, m.rule) for m in mutants()}
    for file in RULE_FILES:
        for group in yaml.safe_load(file.read_text())["groups"]:
            for r, rule in enumerate(group["rules"]):
                if "alert" in rule:  # every alert has something to mutate: a threshold and a duration
                    assert (file.name, f"#{r} {rule['alert']}") in changed


def test_every_mutation_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    every = mutants()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        alive = pool.map(lambda n: survives(every[n], tmp_path / f"mutant-{n}"), range(len(every)))
        survived = [m for m, lives in zip(every, alive, strict=True) if lives]
    with capsys.disabled():
        print(f"\nrule mutations caught by the promtool tests: {len(every) - len(survived)}/{len(every)}")
    assert not survived, "mutations no promtool test notices:\n" + "\n".join(map(str, survived))
