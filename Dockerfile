# syntax=docker/dockerfile:1
# Sluice: one image for every role (`sluice serve`, `sluice worker`, `sluice sim`, ...).
#   docker build -t sluice .
#   docker run --rm -p 8080:8080 -e SLUICE_LISTEN=0.0.0.0:8080 sluice serve

# ---- build ------------------------------------------------------------------------------
# The locked AWS SDK crates need Rust 1.94.1 or newer (the workspace's rust-version says 1.85).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Migrations are embedded into the binary at compile time (sqlx::migrate!), so they are part
# of the build context along with the workspace.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY migrations ./migrations
COPY tests ./tests
# The cache mounts keep the registry and compiled dependencies between builds; the binary is
# copied out of the cached target directory because the mount is gone after this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && install -D -m 0755 target/release/sluice /out/sluice

# ---- runtime ----------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates for HTTPS to providers, curl for the container healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /app --create-home sluice
COPY --from=builder /out/sluice /usr/local/bin/sluice
COPY sluice.toml /app/sluice.toml
WORKDIR /app
USER 10001:10001
ENV SLUICE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# No HEALTHCHECK here: the roles differ (the api answers /healthz on 8080, the simulator on
# 9000, a worker serves no HTTP), so docker-compose.yml and the ECS task definitions set one per role.
ENTRYPOINT ["sluice"]
CMD ["serve"]
