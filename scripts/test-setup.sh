#!/usr/bin/env bash
# First half of the README's test command: installs everything the tests need
# on a fresh machine, then runs lint, format and type checks and the import
# contracts of pyproject.toml. The second half is `python3 -m pytest -q`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

# The dashboard tests drive Debian's chromium through Playwright (installed by
# the test extra above); Playwright's own browser download cannot work on
# machines without general network access. KILLSAFE_CHROMIUM may name another
# chromium binary.
if [ -z "${KILLSAFE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; then
            echo "could not install chromium with apt-get: browser tests will be skipped" >&2
        fi
    else
        echo "chromium is missing and this user cannot install it (apt-get install chromium as root): browser tests will be skipped" >&2
    fi
fi

python3 -m ruff check src tests benchmarks examples
python3 -m ruff format --check src tests benchmarks examples
python3 -m mypy
lint-imports --no-cache  # a cache keyed on files misses a module turned into a package
