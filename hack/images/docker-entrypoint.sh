#!/bin/sh
# The docker-library postgres entrypoint's contract, reduced to what Beam's chart uses:
#   docker-entrypoint.sh postgres [-c NAME=VALUE ...]
# On the first start (no PGDATA/PG_VERSION) it runs initdb with POSTGRES_USER and
# POSTGRES_PASSWORD, listens on every address with scram-sha-256 for TCP clients, creates
# POSTGRES_DB, and runs each /docker-entrypoint-initdb.d/*.sh (executable: run; else sourced)
# against a server reachable only through its Unix socket. Then it execs postgres.
set -eu

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set to initialise a new database}"
    POSTGRES_USER="${POSTGRES_USER:-postgres}"
    POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
    export POSTGRES_USER POSTGRES_DB
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    password_file="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
    initdb --username="$POSTGRES_USER" --pwfile="$password_file" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 -D "$PGDATA"
    rm -f "$password_file"
    printf '%s\n' "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    printf '%s\n' "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -w -t 60 -o "-c listen_addresses=''" start
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
            -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    for script in /docker-entrypoint-initdb.d/*.sh; do
        [ -e "$script" ] || continue
        echo "docker-entrypoint.sh: running $script"
        if [ -x "$script" ]; then
            "$script"
        else
            # shellcheck disable=SC1090
            . "$script"
        fi
    done
    pg_ctl -D "$PGDATA" -w -t 60 -m fast stop
    echo "docker-entrypoint.sh: database initialised"
fi
exec postgres "$@"
