#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (Debian's `postgresql` package), listening only on a unix
# socket in its own temporary folder.
#
#   eval "$(.ci/postgres.sh start)"   # starts it; prints `export WORKBENCH_TEST_DB_URL=... PG_TEST_DIR=...`
#   .ci/postgres.sh stop              # stops it and removes its folder ($PG_TEST_DIR)
#
# initdb refuses to run as root, so as root the cluster belongs to the `postgres` user; otherwise to
# the current user. Messages go to stderr; stdout carries only the export line.
set -euo pipefail

pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  echo "postgres.sh: no PostgreSQL server found under /usr/lib/postgresql (apt-get install postgresql)" >&2
  return 1
}

as_owner() {  # run a command as the cluster's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local bin dir user
  bin=$(pg_bin)
  dir=$(mktemp -d /tmp/workbench-pg.XXXXXX)
  chmod 755 "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; user=postgres; else user=$(id -un); fi
  as_owner "$bin/initdb" -D "$dir/data" -U "$user" -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
  # fsync off: a test database need not survive a power cut, and tests create and drop many databases
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses='' -c unix_socket_directories='$dir' -c fsync=off -c max_connections=200" >&2 ||
    { cat "$dir/server.log" >&2; exit 1; }
  echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') running in $dir" >&2
  echo "export PG_TEST_DIR=$dir WORKBENCH_TEST_DB_URL='postgresql+psycopg://$user@/postgres?host=$dir'"
}

stop() {
  local dir=${PG_TEST_DIR:-} bin
  [ -n "$dir" ] && [ -d "$dir/data" ] || { echo "postgres.sh: PG_TEST_DIR names no server to stop" >&2; return 0; }
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
