# Builds Nudge and runs it with the ONNX Runtime library and the shipped models inside.
#   docker build -t nudge .
#   docker run -p 50051:50051 -p 9464:9464 nudge
#   docker run -p 50051:50051 -p 9464:9464 -v nudge-data:/srv/nudge/data nudge   # a named store

FROM rust:1.95-bookworm AS build
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The same setup as a developer machine: libclang-dev, CMake >= 3.28, the ONNX Runtime wheel.
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh
COPY . .
RUN cargo build --release --locked --bin nudge

FROM debian:bookworm-slim
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nudge /usr/local/bin/nudge
COPY --from=build /src/.tools/ort/onnxruntime/capi/libonnxruntime.so.1.31.1 /usr/local/lib/nudge/
COPY config /srv/nudge/config
COPY models /srv/nudge/models
# The store (store.dir = "data", relative to the working directory) is the one place the
# service writes, so it is the one directory the runtime user owns; everything else stays
# root's and read-only to the service. It is a volume so that the store outlives the
# container: a new named or anonymous volume starts out with this directory's owner, and a
# bind-mounted host directory must be writable by uid 65532.
# tests/integration/image.rs lays this stage out and runs the binary as that user.
RUN install -d -o 65532 -g 65532 -m 0750 /srv/nudge/data
VOLUME /srv/nudge/data
# A container is reached from outside: every listener on all addresses, so the server
# starts only with TLS and API keys, or with plaintext and keyless calls allowed on purpose
# (README, Security).
ENV ORT_DYLIB_PATH=/usr/local/lib/nudge/libonnxruntime.so.1.31.1 \
    NUDGE__LOG__FORMAT=json \
    NUDGE__SERVER__GRPC_ADDR=0.0.0.0:50051 \
    NUDGE__SERVER__METRICS_ADDR=0.0.0.0:9464 \
    NUDGE__SERVER__HTTP_ADDR=0.0.0.0:8088
WORKDIR /srv/nudge
EXPOSE 50051 9464
USER 65532:65532
ENTRYPOINT ["nudge"]
CMD ["serve", "--config", "config/nudge.toml"]
