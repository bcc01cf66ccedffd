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
# The relay is built with its `otel` feature: OpenTelemetry producer spans are compiled in and off
# until configured (OUTBOX_TELEMETRY__ENABLED=true, OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318).
# `--build-arg RELAY_FEATURES=` builds it without them.
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
# bash with pipefail: a failing command on the left of a pipe fails the RUN.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# Keep the manifests and the lock file; replace every target root of every member by a stub, so
# that this stage's output (and the dependency layer built from it) only changes when a manifest
# or Cargo.lock does. Build scripts are kept as they are.
RUN set -eu; \
    mkdir -p /skeleton; \
    find . -path ./target -prune -o \( -name Cargo.toml -o -name Cargo.lock \) -print0 \
        | xargs -0 -r cp --parents -t /skeleton; \
    find /skeleton -mindepth 2 -name Cargo.toml -print0 | while IFS= read -r -d '' manifest; do \
        dir=$(dirname "${manifest#/skeleton/}"); \
        if [ -f "$dir/build.rs" ]; then cp --parents "$dir/build.rs" /skeleton; fi; \
        { find "$dir/src/lib.rs" "$dir/src/main.rs" "$dir/src/bin" "$dir/tests" "$dir/benches" \
               "$dir/examples" -maxdepth 1 -name '*.rs' -print0 2>/dev/null || true; } \
            | while IFS= read -r -d '' f; do \
                mkdir -p "/skeleton/$(dirname "$f")"; \
                if [ "$f" = "$dir/src/lib.rs" ]; then : > "/skeleton/$f"; \
                else echo 'fn main() {}' > "/skeleton/$f"; fi; \
            done; \
    done

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# librdkafka is compiled from source by rdkafka-sys (./configure && make) and linked against the
# system OpenSSL and zlib; the rust image has these already, installing them keeps the build
# working if that ever changes. Not pinned to versions (hadolint DL3008): they are whatever the
# base image's Debian release ships, security updates included; exact pins break the build as soon
# as Debian supersedes a version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Cargo features of the relay. `otel` compiles in the OpenTelemetry exporter, so that tracing can
# be switched on by configuration alone (OUTBOX_TELEMETRY__ENABLED=true, docs/operations.md,
# "Tracing"); it stays off until then.
ARG RELAY_FEATURES=otel

# Dependencies only (cached until a manifest or Cargo.lock changes).
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked -p outbox-relay --bin outbox-relay --features "$RELAY_FEATURES"

# The real sources. COPY keeps the files' original modification times, which can be older than
# the stub build above; touching them makes cargo rebuild the workspace crates for certain.
COPY . .
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p outbox-relay --bin outbox-relay --features "$RELAY_FEATURES" \
 && install -D -m 0755 target/release/outbox-relay /out/outbox-relay

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned for the reason given in the builder stage: the release's current (patched) packages.
# hadolint ignore=DL3008
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
