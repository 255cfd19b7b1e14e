# syntax=docker/dockerfile:1
# Build stage: the release binary.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && for b in $(grep -A1 '^\[\[bench\]\]' Cargo.toml | sed -n 's/^name = "\(.*\)"/\1/p'); do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --bin tiny-backspace && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tiny-backspace

# Runtime stage: slim Debian with git (clones, diffs), CA certificates (GitHub, E2B, models), and
# what the local sandbox offers the agent (python3, make). The server runs as a non-root user: the
# local sandbox then uses user namespaces where the container runtime allows them, else Landlock.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates python3 make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 tiny \
    && mkdir /data && chown tiny: /data
COPY --from=build /src/target/release/tiny-backspace /usr/local/bin/tiny-backspace
USER tiny
WORKDIR /home/tiny
ENV HOST=0.0.0.0 \
    PORT=8000 \
    LOG_FORMAT=json \
    WORKSPACE_DIR=/home/tiny/workspaces \
    DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT}"]
ENTRYPOINT ["tiny-backspace"]
CMD ["serve"]
