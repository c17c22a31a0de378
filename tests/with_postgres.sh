#!/usr/bin/env bash
# Runs its arguments (the storage tests on Postgres) with TEST_POSTGRES_URL naming a Postgres server the tests
# may create a throwaway database on: TEST_POSTGRES_URL itself if set, else the server on 127.0.0.1:5432 if
# one answers as `postgres` without a password, else a throwaway server started here from Debian's PostgreSQL
# binaries (`make postgres-tools` installs them) in a temporary folder, on a free port, stopped and removed
# when the command ends (TEST_POSTGRES_THROWAWAY=1: always that one).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

answers() {
    "$PYTHON" - "$1" <<'PY' >/dev/null 2>&1
import sys, psycopg
psycopg.connect(sys.argv[1], connect_timeout=3).close()
PY
}

if [ -n "${TEST_POSTGRES_URL:-}" ]; then
    exec "$@"
fi
if [ -z "${TEST_POSTGRES_THROWAWAY:-}" ] && answers "postgresql://postgres@127.0.0.1:5432/postgres"; then
    TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:5432/postgres" exec "$@"
fi
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    echo "with_postgres.sh: no Postgres server answers and no PostgreSQL binaries: run make postgres-tools" >&2
    exit 1
fi

folder=$(mktemp -d /tmp/gateway-test-postgres.XXXXXX)
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# initdb refuses to run as root: the cluster then belongs to Debian's `postgres` user.
as_owner=()
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$folder"
    as_owner=(runuser -u postgres --)
fi
stop() {
    "${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$folder/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$folder"
}
trap stop EXIT
echo "with_postgres.sh: starting a throwaway PostgreSQL on 127.0.0.1:$port" >&2
"${as_owner[@]}" "$PG_BIN/initdb" -D "$folder/data" -U postgres --auth=trust -E UTF8 >"$folder/initdb.log"
"${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$folder/data" -l "$folder/server.log" -w \
    -o "-p $port -k $folder -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres" "$@"
