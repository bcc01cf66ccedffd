#!/usr/bin/env bash
# Checks that outbox-core pulls in no TLS library its user did not ask for: with every feature
# but the TLS ones (`tls-native-tls`, `tls-rustls`, `kafka-tls`), its dependency tree has neither
# OpenSSL, native-tls nor rustls; each TLS feature brings exactly the backend it names (so the
# check itself can fail). Run by .ci/run; needs only the lock file and the fetched crates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

features=$(cargo metadata --locked --format-version 1 --no-deps |
  python3 -c 'import json, sys
m = json.load(sys.stdin)
core = next(p for p in m["packages"] if p["name"] == "outbox-core")
print(",".join(sorted(f for f in core["features"] if not f.startswith("tls-") and f != "kafka-tls")))')

# Whether outbox-core with $1 (a feature list) depends on package $2 (normal and build edges).
has() {
  cargo tree --locked -p outbox-core --features "$1" -e normal,build -i "$2" >/dev/null 2>&1
}

failed=0
for tls in openssl-sys native-tls rustls; do
  if has "$features" "$tls"; then
    echo "outbox-core with features [$features] depends on $tls, which no feature asked for:" >&2
    cargo tree --locked -p outbox-core --features "$features" -e normal,build -i "$tls" >&2 || true
    failed=1
  fi
done
for pair in tls-native-tls:native-tls tls-rustls:rustls kafka-tls:openssl-sys; do
  feature=${pair%%:*} backend=${pair#*:}
  if ! has "$feature" "$backend"; then
    echo "outbox-core's $feature feature no longer brings $backend" >&2
    failed=1
  fi
done
if [ "$failed" = 0 ]; then
  echo "outbox-core [$features]: no TLS backend; tls-native-tls, tls-rustls and kafka-tls each bring theirs"
fi
exit "$failed"
