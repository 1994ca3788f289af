# Builds Nudge and runs it with the ONNX Runtime library and the shipped models inside.
#   docker build -t nudge .
#   docker run -p 50051:50051 -p 9464:9464 nudge

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
ENV ORT_DYLIB_PATH=/usr/local/lib/nudge/libonnxruntime.so.1.31.1 \
    NUDGE__LOG__FORMAT=json
WORKDIR /srv/nudge
EXPOSE 50051 9464
USER 65532:65532
ENTRYPOINT ["nudge"]
CMD ["serve", "--config", "config/nudge.toml"]
