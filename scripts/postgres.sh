#!/usr/bin/env bash
# A PostgreSQL server of your own, for Optuna studies shared by several workers.
#
#   scripts/postgres.sh start DIR [PORT]   create DIR (once) and start a server on
#                                          127.0.0.1:PORT (default: a free port) and a
#                                          unix socket in DIR; prints the storage URL
#   scripts/postgres.sh url DIR            print the URL of the server in DIR
#   scripts/postgres.sh stop DIR           stop it (DIR stays; start it again later)
#
# Debian's postgresql refuses to run as root: as root the server runs as the
# `postgres` user, so DIR must be reachable by that user (mktemp -d in /tmp is).
# Trust authentication: anyone who can reach 127.0.0.1 on this machine can
# connect, so use it on a machine you control, or put a password on it.
# KILLSAFE_PG_BIN names the directory of initdb and pg_ctl (default: the newest
# /usr/lib/postgresql/*/bin); KILLSAFE_PG_OPTIONS adds server options, for
# example "-c fsync=off" for throwaway test servers.
set -euo pipefail

usage() {
    echo "usage: $0 start DIR [PORT] | url DIR | stop DIR" >&2
    exit 2
}

[ $# -ge 2 ] || usage
command=$1
dir=$(realpath -m "$2")
bindir=${KILLSAFE_PG_BIN:-$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$bindir" ] || [ ! -x "$bindir/pg_ctl" ]; then
    echo "error: PostgreSQL's initdb and pg_ctl not found; apt-get install postgresql, or set KILLSAFE_PG_BIN" >&2
    exit 2
fi

as_server_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

url() {
    echo "postgresql+psycopg2://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
}

case "$command" in
start)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        mkdir -p "$dir"
        if [ "$(id -u)" = 0 ]; then
            chown postgres: "$dir"
            if ! runuser -u postgres -- test -w "$dir"; then
                echo "error: the postgres user cannot reach $dir; choose a directory it can enter" >&2
                exit 2
            fi
        fi
        if ! as_server_user "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust \
            -E UTF8 >"$dir/initdb.log" 2>&1; then
            echo "error: initdb failed in $dir/data; see $dir/initdb.log" >&2
            exit 1
        fi
    fi
    port=${3:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    echo "$port" >"$dir/port"
    if ! as_server_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir ${KILLSAFE_PG_OPTIONS:-}" start >/dev/null; then
        echo "error: the server in $dir did not start; see $dir/server.log" >&2
        exit 1
    fi
    url
    ;;
url)
    [ -f "$dir/port" ] || { echo "error: no server was started in $dir" >&2; exit 2; }
    url
    ;;
stop)
    as_server_user "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
*)
    usage
    ;;
esac
