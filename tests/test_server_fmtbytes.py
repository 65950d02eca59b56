"""The dashboard's ``fmtBytes`` writes the same strings as ``killsafe.units.format_size``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from killsafe.units import format_size

APP_JS = Path(__file__).parent.parent / "src" / "killsafe" / "server" / "static" / "app.js"
SIZES = [0, 1, 512, 1023, 1024, 1536, 929024, 3 * 1024 + 400, 118655, 1048575, 1048576]
SIZES += [1288490188, 5 * 10**12, 2**40 * 3 + 2**39, 1075 * 1024, 1076 * 1024 + 512]


def test_fmt_bytes_matches_format_size() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (
        "const src = require('fs').readFileSync(process.argv[1], 'utf8');"
        "const fns = src.match(/function fmtBytes[\\s\\S]*?\\n}\\n/)[0]"
        " + src.match(/function oneDecimal[\\s\\S]*?\\n}\\n/)[0];"
        "const fmt = new Function(fns + 'return fmtBytes;')();"
        "console.log(JSON.stringify(JSON.parse(process.argv[2]).map(fmt)));"
    )
    values = [*SIZES, None]
    out = subprocess.run(
        [node, "-e", script, str(APP_JS), json.dumps(values)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [format_size(v) for v in values]
