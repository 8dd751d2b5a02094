# syntax=docker/dockerfile:1
#
# adstream: one image holding every binary of the workspace
# (adstream-producer, adstream-processor, adstream-sink, adstream-admin)
# plus topics.sh. docker-compose.yml runs each service from this image with
# a different command.
#
#   docker build -t adstream:local .
#
# Needs BuildKit (the default since Docker 23 and always used by
# `docker compose build`) for the cache mounts below.

############################ builder ############################
FROM rust:1-bookworm AS builder

# rdkafka's `cmake-build` feature compiles librdkafka from source: it needs
# cmake and a C/C++ toolchain, and links libcurl, OpenSSL, Cyrus SASL and zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        cmake g++ make pkg-config \
        libcurl4-openssl-dev libssl-dev libsasl2-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The target directory and the cargo registry live in cache mounts, so the
# binaries are copied out to /out inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --workspace \
 && mkdir -p /out \
 && cp target/release/adstream-producer \
       target/release/adstream-processor \
       target/release/adstream-sink \
       target/release/adstream-admin \
       /out/

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# Shared libraries librdkafka was linked against, plus CA roots for TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ca-certificates libcurl4 libssl3 libsasl2-2 zlib1g \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 adstream \
 && useradd --system --uid 10001 --gid adstream \
        --home-dir /home/adstream --create-home --shell /usr/sbin/nologin adstream

COPY --from=builder \
     /out/adstream-producer \
     /out/adstream-processor \
     /out/adstream-sink \
     /out/adstream-admin \
     /usr/local/bin/
COPY topics.sh /usr/local/bin/topics.sh
RUN chmod 0755 /usr/local/bin/topics.sh

USER adstream
WORKDIR /home/adstream

# Prometheus text at http://<METRICS_ADDR>/metrics (processor and sink).
ENV METRICS_ADDR=0.0.0.0:9464 \
    RUST_LOG=info
EXPOSE 9464

CMD ["adstream-processor"]
