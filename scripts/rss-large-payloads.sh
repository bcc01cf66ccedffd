#!/bin/bash
# Peak RSS of the relay while it drains 20,000 events of ~100 KB (issue 11 item 8).
#
#   scripts/services.sh up && . .services/env
#   scripts/rss-large-payloads.sh target/debug/outbox-relay [NAME=VALUE ...]
#
# Creates a throw-away database next to $DATABASE_URL, fills the outbox with 20 x 1000 rows whose
# payload is {"blob": <100,000 characters>} (a repeated md5: compressible, so the broker's memory
# stays small with lz4), starts the relay with the given extra environment, waits until every row
# is marked published, reads VmHWM from /proc, stops the relay with SIGTERM and drops the database.
set -euo pipefail
BIN=$1
shift
: "${DATABASE_URL:?run scripts/services.sh up and source .services/env first}"
BASE=${DATABASE_URL%/*}
DB=rss_$$_$RANDOM
psql "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
export OUTBOX_DATABASE_URL=$BASE/$DB
"$BIN" migrate >/dev/null 2>&1 || { echo "outbox-relay migrate failed"; exit 1; }
for i in $(seq 0 19); do
  psql "$OUTBOX_DATABASE_URL" -qc "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
    SELECT gen_random_uuid(), 'big_$DB', 'a' || (g % 100), 'Big',
           jsonb_build_object('blob', repeat(md5(g::text), 3125))
    FROM generate_series($i * 1000 + 1, $i * 1000 + 1000) g" >/dev/null
done
N=$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT count(*) FROM outbox")
BYTES=$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT sum(octet_length(payload::text)) FROM outbox")
LOG=$(mktemp)
START=$(date +%s.%N)
env RUST_LOG=warn OUTBOX_KAFKA__PROPERTIES__COMPRESSION_TYPE=lz4 "$@" "$BIN" run 2>"$LOG" &
PID=$!
while [ "$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT count(*) FROM outbox WHERE published_at IS NULL")" != 0 ]; do
  kill -0 $PID 2>/dev/null || { echo "the relay exited:"; cat "$LOG"; exit 1; }
  sleep 0.2
done
END=$(date +%s.%N)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
kill -TERM $PID
RC=0
wait $PID || RC=$?
echo "events=$N payload_bytes=$BYTES drain_s=$(echo "$END - $START" | bc) peak_rss_kb=$HWM exit=$RC"
rm -f "$LOG"
