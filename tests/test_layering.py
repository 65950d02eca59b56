"""Import rules that keep the rooms apart (until import-linter contracts enforce them)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "killsafe"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_distributed_room_imports_torch_distributed() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "distributed" in path.parents:
            continue
        for name in imported_modules(path):
            if name == "torch.distributed" or name.startswith("torch.distributed."):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_only_run_may_import_the_distributed_room() -> None:
    """And the one command that works on sharded checkpoints themselves: ``consolidate``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in ("distributed", "run", "run.py"):
            continue
        if path.relative_to(PACKAGE).as_posix() == "cli/consolidate.py":
            continue
        for name in imported_modules(path):
            if name == "killsafe.distributed" or name.startswith("killsafe.distributed."):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offenders == []


def test_the_check_sees_imports_of_torch_distributed(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch.distributed as dist\n"
        "from torch import distributed\n"
        "def f():\n    from torch.distributed.checkpoint import save\n"
    )
    names = imported_modules(sample)
    assert {"torch.distributed", "torch.distributed.checkpoint"} <= names
