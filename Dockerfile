# syntax=docker/dockerfile:1
# One Dockerfile for every service; the build argument BINARY picks the one the image
# runs (one binary per image):
#   docker build --build-arg BINARY=enricher -t kafka-llm-enrich/enricher .
# BINARY: ingest-dedup | enricher | publisher | dlq-replayer | llm-sim | loadgen

FROM rust:1.95-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --workspace --bins \
 && mkdir -p /out \
 && for b in ingest-dedup enricher publisher dlq-replayer llm-sim loadgen; do cp "target/release/$b" /out/; done

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin enrich
ARG BINARY
COPY --from=builder /out/${BINARY} /usr/local/bin/service
COPY config/pipeline.toml /etc/enrich/pipeline.toml
ENV ENRICH_CONFIG=/etc/enrich/pipeline.toml
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/service"]
