# syntax=docker/dockerfile:1
#
# The outbox-relay container image.
#
#   docker build -t outbox-relay .
#   docker run --rm outbox-relay --help
#   docker run --rm -p 9187:9187 \
#       -e OUTBOX_DATABASE_URL=postgres://relay:secret@db:5432/app \
#       -e OUTBOX_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
#       outbox-relay                       # = outbox-relay run
#
# Stages:
#   skeleton  every Cargo.toml of the workspace plus Cargo.lock, with stub sources
#   builder   builds the dependencies from the skeleton (a layer that changes only when a manifest
#             or the lock file changes), then the real sources
#   runtime   debian:bookworm-slim with the shared libraries the binary links and nothing else
#
# The binary links libssl.so.3/libcrypto.so.3 (sqlx TLS and librdkafka SSL), libz.so.1 (librdkafka
# compression), libgcc_s, libm and libc: bookworm's libssl3 and zlib1g packages, the rest is in the
# base image. The runtime stage checks this with ldd and fails the build if anything is missing.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS skeleton
WORKDIR /src
COPY . .
# Keep the manifests and the lock file; replace every target root of every member by a stub, so
# that this stage's output (and the dependency layer built from it) only changes when a manifest
# or Cargo.lock does. Build scripts are kept as they are.
RUN set -eu; \
    mkdir -p /skeleton; \
    find . -path ./target -prune -o \( -name Cargo.toml -o -name Cargo.lock \) -print \
        | xargs -r cp --parents -t /skeleton; \
    for manifest in $(cd /skeleton && find . -mindepth 2 -name Cargo.toml); do \
        dir=$(dirname "$manifest"); \
        [ -f "$dir/build.rs" ] && cp --parents "$dir/build.rs" /skeleton; \
        for f in $(cd "$dir" && find src/lib.rs src/main.rs src/bin tests benches examples \
                       -maxdepth 1 -name '*.rs' 2>/dev/null); do \
            mkdir -p "/skeleton/$dir/$(dirname "$f")"; \
            if [ "$f" = src/lib.rs ]; then : > "/skeleton/$dir/$f"; \
            else echo 'fn main() {}' > "/skeleton/$dir/$f"; fi; \
        done; \
    done

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
# librdkafka is compiled from source by rdkafka-sys (./configure && make) and linked against the
# system OpenSSL and zlib; the rust image has these already, installing them keeps the build
# working if that ever changes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# Dependencies only (cached until a manifest or Cargo.lock changes).
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked -p outbox-relay --bin outbox-relay

# The real sources. COPY keeps the files' original modification times, which can be older than
# the stub build above; touching them makes cargo rebuild the workspace crates for certain.
COPY . .
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p outbox-relay --bin outbox-relay \
 && install -D -m 0755 target/release/outbox-relay /out/outbox-relay

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin outbox
COPY --from=builder /out/outbox-relay /usr/local/bin/outbox-relay
# Fail the build if the binary needs a shared library the image does not have.
RUN if ldd /usr/local/bin/outbox-relay | grep -q 'not found'; then \
        ldd /usr/local/bin/outbox-relay; exit 1; \
    fi \
 && /usr/local/bin/outbox-relay --version

LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Relays committed transactional-outbox events from PostgreSQL to Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric user, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# The admin endpoint (/healthz, /readyz, /metrics, /status) listens on all interfaces of the pod;
# keep the port off public Services.
ENV OUTBOX_ADMIN_ADDR=0.0.0.0:9187
EXPOSE 9187
# SIGTERM (the default stop signal) drains in-flight events and exits 0 within shutdown_timeout.
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
