"""docs/guide.md stays true to the code: every error explained, every example covered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import killsafe.errors

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "guide.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", GUIDE, re.M | re.S)
    assert match, f"docs/guide.md has no '## {title}' section"
    return match.group(1)


def test_troubleshooting_explains_every_error_class() -> None:
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", section("Troubleshooting"), re.M)
    }
    errors = [n for n in killsafe.errors.__all__ if n not in ("KillsafeError", "ResumableError")]
    assert sorted(rows) == sorted(errors)
    assert all(len(text) > 20 for text in rows.values())


def test_every_example_has_a_workload_section() -> None:
    workloads = section("Workloads")
    headings = re.findall(r"^### .*\(`examples/(\w+)\.py`", workloads, re.M)
    examples = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    assert sorted(headings) == examples


def test_best_practices_cover_clusters_and_terminals() -> None:
    text = section("Best practices")
    for topic in ("How often", "Where", "How much disk", "SLURM", "Kubernetes", "tmux", "nohup"):
        assert topic in text, topic
    assert "terminationGracePeriodSeconds" in text and "KillWait" in text
    assert "Quick start" in GUIDE


def test_optuna_is_an_optional_extra_and_a_test_dependency() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("optuna") for req in extras["optuna"])
    assert any(req.startswith("optuna") for req in extras["test"])
