"""README.md and docs/ stay true: snippets do what they say; the docs speak of the project alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import killsafe

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_store_snippet_loads_what_it_just_saved_next_to_the_first_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, *others = re.findall(r'killsafe\.Run\("([^"]+)"', README)
    assert all(other == run_dir for other in others)  # one run, with a mirror or without
    (store_block,) = [block for block in _python_blocks() if "CheckpointStore(" in block]
    monkeypatch.chdir(tmp_path)
    # The first example has run (and saved later steps) in its directory.
    with killsafe.Run(run_dir, total_steps=3, save_every_steps=1, progress=False) as run:
        run.track(weights=[0.0])
        for _ in run.steps():
            pass
    scope = {"killsafe": killsafe, "pos": {"AAPL": 3}, "cash": 12.5, "n_trades": 1}
    exec(compile(store_block, "README.md", "exec"), scope)
    assert scope["state"] == {"positions": {"AAPL": 3}, "cash": 12.5}
    assert scope["info"].step == 1
    store_dir = Path(re.findall(r'CheckpointStore\("([^"]+)"', store_block)[0])
    assert Path(run_dir) not in (store_dir, *store_dir.parents), "the snippets share a directory"
    assert os.path.isdir(store_dir)


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_the_docs_point_at_nothing_outside_the_project(page: Path) -> None:
    text = page.read_text()
    outside = re.findall(r"\.\./shared|shared/DESIGN|DESIGN\.md|/work/|\bissues? #?\d+", text, re.I)
    assert not outside, f"{page.name} points outside the project: {outside}"
