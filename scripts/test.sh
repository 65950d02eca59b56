#!/usr/bin/env bash
# The README's test command: installs everything the tests need on a fresh
# machine, then runs lint, format, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

# The dashboard tests drive Debian's chromium; Playwright's own browser
# download cannot work on machines without general network access.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null
    else
        echo "chromium is missing and this user cannot install it: browser tests will be skipped" >&2
    fi
fi

python3 -m ruff check src tests benchmarks examples
python3 -m ruff format --check src tests benchmarks examples
python3 -m mypy
python3 -m pytest -q "$@"
