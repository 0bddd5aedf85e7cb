# syntax=docker/dockerfile:1
#
# One image for every CryptoVault binary: vault-api, vault-engine, vault-worker (and
# vault-loadgen). Each service picks its binary with the entrypoint, e.g.
#
#   docker build -t cryptovault:local .
#   docker run --rm cryptovault:local                        # vault-api serve
#   docker run --rm --entrypoint vault-engine cryptovault:local
#   docker run --rm --entrypoint vault-worker cryptovault:local audit
#
# docker-compose.yml and deploy/k8s set the entrypoint (command) per service. Configuration is
# environment only (see README "Configuration"); the image carries no secrets and no .env.
# Inside a container the processes must listen on 0.0.0.0: set API_ADDR / OPS_ADDR.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------------------------
# Build: dependencies first, in a layer of their own, then our crates.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Manifests and stub targets only: this layer (every dependency compiled) is rebuilt only when
# a Cargo.toml or Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY core/Cargo.toml core/build.rs core/
COPY nats/Cargo.toml nats/
COPY engine/Cargo.toml engine/
COPY api/Cargo.toml api/
COPY workers/Cargo.toml workers/
COPY loadgen/Cargo.toml loadgen/
COPY testkit/Cargo.toml testkit/
RUN set -eux; \
    for crate in core nats engine api workers testkit; do \
      mkdir -p "$crate/src"; echo '' > "$crate/src/lib.rs"; \
    done; \
    for crate in engine api workers loadgen; do \
      mkdir -p "$crate/src"; echo 'fn main() {}' > "$crate/src/main.rs"; \
    done; \
    mkdir -p engine/benches migrations; \
    echo 'fn main() {}' > engine/benches/portfolio.rs; \
    echo 'fn main() {}' > engine/benches/actors.rs; \
    cargo build --release --locked --workspace --bins; \
    rm -rf core/src nats/src engine/src engine/benches api/src workers/src loadgen/src testkit/src

# The real sources. COPY keeps the files' own modification times, which may be older than the
# stub build's outputs: touch them so cargo rebuilds our crates (and never ships a stub).
COPY migrations migrations
COPY core core
COPY nats nats
COPY engine engine
COPY api api
COPY workers workers
COPY loadgen loadgen
COPY testkit testkit
RUN set -eux; \
    find core nats engine api workers loadgen testkit migrations -type f -exec touch {} +; \
    cargo build --release --locked --workspace --bins; \
    mkdir -p /out; \
    cp target/release/vault-api target/release/vault-engine target/release/vault-worker \
       target/release/vault-loadgen /out/

# ---------------------------------------------------------------------------------------------
# Runtime: Debian slim, CA certificates (webhooks, SMTP, Sentry over TLS), curl for container
# health checks, and an unprivileged user. No compiler, no sources.
FROM debian:bookworm-slim AS runtime
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 vault; \
    useradd --system --uid 10001 --gid vault --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vault
COPY --from=build /out/ /usr/local/bin/
# An empty working directory: no stray .env is read.
WORKDIR /app
USER 10001:10001
# The API (API_ADDR), then the ops endpoints of engine, prices, audit and notify (OPS_ADDR).
EXPOSE 8080 9100 9101 9102 9103
STOPSIGNAL SIGTERM
ENTRYPOINT ["vault-api"]
CMD ["serve"]
