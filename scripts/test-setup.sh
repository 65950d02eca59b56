#!/usr/bin/env bash
# First half of the README's test command: installs everything the tests need
# on a fresh machine, then runs lint, format and type checks and the import
# contracts of pyproject.toml. The second half is `python3 -m pytest -q`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

# Debian packages some tests need, installed when missing and this user can;
# without them those tests are skipped.
apt_install() {  # PACKAGE WHAT-NEEDS-IT
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1") >/dev/null; then
            echo "could not install $1 with apt-get: $2 will be skipped" >&2
        fi
    else
        echo "$1 is missing and this user cannot install it (apt-get install $1 as root): $2 will be skipped" >&2
    fi
}

# The dashboard tests drive Debian's chromium through Playwright (installed by
# the test extra above); Playwright's own browser download cannot work on
# machines without general network access. KILLSAFE_CHROMIUM may name another
# chromium binary.
if [ -z "${KILLSAFE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium "browser tests"
fi

# Workers sharing one Optuna study run against a real PostgreSQL server that
# scripts/postgres.sh starts; KILLSAFE_PG_BIN may name another bin directory.
if [ -z "${KILLSAFE_PG_BIN:-}" ] && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    apt_install postgresql "the PostgreSQL tests"
fi

python3 -m ruff check src tests benchmarks examples
python3 -m ruff format --check src tests benchmarks examples
python3 -m mypy
lint-imports --no-cache  # a cache keyed on files misses a module turned into a package
