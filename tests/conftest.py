"""Test set-up shared by every test module.

Tests always exercise the tree they live in: ``src`` is put first on
``sys.path`` and on ``PYTHONPATH`` so that subprocesses import the same code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
