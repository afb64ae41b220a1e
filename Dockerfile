# audio-store container image.
#
#   docker build -t audio-store .
#   docker run --rm audio-store check-config
#
# Two stages: a Rust builder, and a distroless runtime (glibc, CA
# certificates, no shell) that runs as the non-root user 65532.
# Linted (not built) by scripts/lint-deploy with hadolint.

# ---- builder ---------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml
# or Cargo.lock change. Stub targets let cargo build every dependency.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# Then the crate itself. COPY keeps the sources' modification times, which can
# be older than the stub build above: touch the crate roots so cargo rebuilds.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin audio-store \
    && cp target/release/audio-store /audio-store

# ---- runtime ---------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /audio-store /usr/local/bin/audio-store
COPY config/ /etc/audio-store/

# The documented production example; Kubernetes mounts its ConfigMap over
# /etc/audio-store. Any key can still be overridden by AUDIO_STORE__SECTION__KEY.
ENV AUDIO_STORE_CONFIG=/etc/audio-store/production.toml

# The image's nonroot:nonroot, numerically: kubelet can only enforce
# runAsNonRoot on a numeric user (hadolint DL3066).
USER 65532:65532

# http.listen: /healthz /readyz /metrics
EXPOSE 8080

ENTRYPOINT ["audio-store"]
CMD ["run"]
