#!/bin/bash
# Peak RSS of the relay while it drains 20,000 events of ~100 KB (issue 11 item 8).
#
#   scripts/services.sh up && . .services/env
#   RSS_PATH=polling|logical-backfill|logical-stream scripts/rss-large-payloads.sh \
#     target/debug/outbox-relay [NAME=VALUE ...]
#
# Creates a throw-away database next to $DATABASE_URL, fills the outbox with 20 x 1000 rows whose
# payload is {"blob": <100,000 characters>} (a repeated md5: compressible, so the broker's memory
# stays small with lz4), runs the relay with the given extra environment until every row is
# marked published, reads VmHWM from /proc, stops the relay with SIGTERM and drops the database
# (and the replication slots of the logical paths).
#
# RSS_PATH (default polling):
#   polling           rows written first, then the polling source drains them.
#   logical-backfill  rows written first, then the logical source (table mode) starts: it creates
#                     its slot and re-publishes every row from the table.
#   logical-stream    the logical source starts once to create its slot and is stopped; the rows
#                     are written (20 transactions of 1000 rows, kept in the WAL by the slot); then
#                     the relay starts again and streams the backlog from the slot (the worst case
#                     for what the replication client reads ahead).
set -euo pipefail
BIN=$1
shift
RSS_PATH=${RSS_PATH:-polling}
case $RSS_PATH in
  polling | logical-backfill | logical-stream) ;;
  *) echo "RSS_PATH must be polling, logical-backfill or logical-stream"; exit 2 ;;
esac
: "${DATABASE_URL:?run scripts/services.sh up and source .services/env first}"
BASE=${DATABASE_URL%/*}
DB=rss_$$_$RANDOM
psql "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
cleanup() {
  [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  psql "$DATABASE_URL" -qc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
    WHERE slot_name IN ('$DB', '${DB}_bf')" >/dev/null 2>&1 || true
  psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
  rm -f "${LOG:-}"
}
trap cleanup EXIT
export OUTBOX_DATABASE_URL=$BASE/$DB
SOURCE_ENV=()
if [ "$RSS_PATH" != polling ]; then
  SOURCE_ENV=(OUTBOX_SOURCE=logical OUTBOX_WRITE_MODE=table OUTBOX_SLOT=$DB OUTBOX_PUBLICATION=${DB}_pub)
fi
"$BIN" migrate >/dev/null 2>&1 || { echo "outbox-relay migrate failed"; exit 1; }
write_rows() {
  for i in $(seq 0 19); do
    psql "$OUTBOX_DATABASE_URL" -qc "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
      SELECT gen_random_uuid(), 'big_$DB', 'a' || (g % 100), 'Big',
             jsonb_build_object('blob', repeat(md5(g::text), 3125))
      FROM generate_series($i * 1000 + 1, $i * 1000 + 1000) g" >/dev/null
  done
}
LOG=$(mktemp)
start_relay() {
  env RUST_LOG=warn OUTBOX_KAFKA__PROPERTIES__COMPRESSION_TYPE=lz4 "${SOURCE_ENV[@]}" "$@" "$BIN" run 2>"$LOG" &
  PID=$!
}
if [ "$RSS_PATH" = logical-stream ]; then
  start_relay "$@"
  until [ "$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT count(*) FROM pg_replication_slots
      WHERE slot_name = '$DB' AND active AND confirmed_flush_lsn IS NOT NULL")" = 1 ]; do
    kill -0 $PID 2>/dev/null || { echo "the relay exited:"; cat "$LOG"; exit 1; }
    sleep 0.2
  done
  kill -TERM $PID
  wait $PID || { echo "the relay did not stop cleanly:"; cat "$LOG"; exit 1; }
  PID=
fi
write_rows
START=$(date +%s.%N)
start_relay "$@"
N=$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT count(*) FROM outbox")
BYTES=$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT sum(octet_length(payload::text)) FROM outbox")
while [ "$(psql "$OUTBOX_DATABASE_URL" -Atc "SELECT count(*) FROM outbox WHERE published_at IS NULL")" != 0 ]; do
  kill -0 $PID 2>/dev/null || { echo "the relay exited:"; cat "$LOG"; exit 1; }
  sleep 0.2
done
END=$(date +%s.%N)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
kill -TERM $PID
RC=0
wait $PID || RC=$?
PID=
echo "path=$RSS_PATH events=$N payload_bytes=$BYTES drain_s=$(echo "$END - $START" | bc) peak_rss_kb=$HWM exit=$RC"
