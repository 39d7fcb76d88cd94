#!/bin/sh
# PostgreSQL as the official image starts it: on first start, a UTF-8 cluster in $PGDATA with the superuser
# $POSTGRES_USER (password $POSTGRES_PASSWORD, required from other hosts) and the database $POSTGRES_DB; then the
# server in the foreground, on every address, as process 1 (the image stops it with SIGINT: a fast shutdown).
set -eu
: "${POSTGRES_USER:=postgres}" "${POSTGRES_DB:=$POSTGRES_USER}" "${PGDATA:=/var/lib/postgresql/data}"
[ -n "${POSTGRES_PASSWORD:-}" ] || { echo "postgres-entrypoint.sh: set POSTGRES_PASSWORD" >&2; exit 1; }
PATH=$(echo /usr/lib/postgresql/*/bin):$PATH
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$password"
  initdb --pgdata "$PGDATA" --username "$POSTGRES_USER" --pwfile "$password" --encoding UTF8 --locale C.UTF-8 \
    --auth-local trust --auth-host scram-sha-256 >/dev/null
  rm "$password"
  echo 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    postgres --single -D "$PGDATA" postgres <<SQL >/dev/null
CREATE DATABASE "$POSTGRES_DB" OWNER "$POSTGRES_USER";
SQL
  fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
