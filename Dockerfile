# presence-gateway container image.
#
#   docker build -t presence-gateway .          # or: podman build --format docker ...
#   docker run -p 8080:8080 -v pg-state:/var/lib/presence-gateway --read-only \
#     -v $PWD/my-config.toml:/etc/presence-gateway/presence-gateway.toml:ro \
#     -e MITEL_APPLICATION_ID -e PG_CONSUMER_TOKEN ... \
#     presence-gateway
#
# Two stages: the Rust toolchain builds a release binary; the runtime image is
# Debian slim with CA certificates and the time-zone database added, running
# as an unprivileged user. scripts/container-test builds this file as it is
# and runs the runtime image through a smoke test (CI does on every run).

# ---- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. Cargo refuses a manifest whose
# target files are missing, so every target is stubbed: the library, the
# binary, and each [[bench]], [[bin]], [[test]] and [[example]] the manifest
# declares (at its `path`, else where cargo looks for it by name), read from
# Cargo.toml itself so that a new target cannot break this step.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && touch src/lib.rs \
    && echo 'fn main() {}' > src/main.rs \
    && awk -F'"' ' \
        function flush() { \
            if (dir != "" && (path != "" || name != "")) \
                print (path != "" ? path : dir "/" name ".rs"); \
            dir = name = path = "" \
        } \
        /^[[:space:]]*\[/ { flush() } \
        /^[[:space:]]*\[\[bench\]\]/ { dir = "benches" } \
        /^[[:space:]]*\[\[test\]\]/ { dir = "tests" } \
        /^[[:space:]]*\[\[example\]\]/ { dir = "examples" } \
        /^[[:space:]]*\[\[bin\]\]/ { dir = "src/bin" } \
        dir != "" && $1 ~ /^[[:space:]]*name[[:space:]]*=[[:space:]]*$/ { name = $2 } \
        dir != "" && $1 ~ /^[[:space:]]*path[[:space:]]*=[[:space:]]*$/ { path = $2 } \
        END { flush() }' Cargo.toml > /tmp/stubs \
    && while read -r stub; do \
        mkdir -p "$(dirname "$stub")" && echo 'fn main() {}' > "$stub"; \
    done < /tmp/stubs \
    && cargo build --locked --release \
    && rm -rf src benches tests examples /tmp/stubs

COPY src ./src
COPY benches ./benches
# The OpenAPI description is embedded in the binary (GET /openapi.json).
COPY openapi/openapi.json ./openapi/openapi.json
# COPY keeps the files' own modification times, which can be older than the
# stub build above; cargo would then call the stub artifacts fresh and ship a
# binary that does nothing. Touching the sources makes them newer; the stub
# binary prints nothing, so the version check fails the build if one slipped
# through anyway.
RUN find src -type f -exec touch {} + \
    && cargo build --locked --release \
    && ./target/release/presence-gateway --version | grep -q '^presence-gateway '

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim

# CA certificates: the gateway calls provider APIs over HTTPS (subscriptions,
# tokens). tzdata: a NetSapiens source's `timezone` (e.g. "America/New_York")
# is looked up in /usr/share/zoneinfo, which Debian's slim image lacks.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 presence-gateway \
    && useradd --system --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin \
        presence-gateway \
    && mkdir -p /var/lib/presence-gateway \
    && chown 10001:10001 /var/lib/presence-gateway

COPY --from=builder /build/target/release/presence-gateway /usr/local/bin/presence-gateway
# The image's default config is example.toml, which reads its secrets from
# MITEL_APPLICATION_ID, NS_SUBSCRIPTION_ID and PG_CONSUMER_TOKEN: a container
# started without them refuses to start instead of accepting webhooks signed
# with the public development key. Mount your own presence-gateway.toml over it as needed.
COPY config/example.toml /etc/presence-gateway/example.toml
COPY config/example.toml /etc/presence-gateway/presence-gateway.toml

# The CLI reads --config from PRESENCE_GATEWAY_CONFIG. Listen on every
# interface of the container whatever a mounted file says; the healthcheck
# subcommand reads the same variable to find the port.
ENV PRESENCE_GATEWAY_CONFIG=/etc/presence-gateway/presence-gateway.toml \
    PRESENCE_GATEWAY__SERVER__LISTEN=0.0.0.0:8080 \
    PRESENCE_GATEWAY__STORE__DATA_DIR=/var/lib/presence-gateway

# State (records, replay history, seq, subscriptions) persists here: mount a
# volume so it survives the container. Ignored with backend = "redis".
VOLUME /var/lib/presence-gateway

USER 10001:10001
EXPOSE 8080

# `healthcheck` probes GET /healthz on the configured port (its own timeout is
# 3 s) and exits non-zero when it does not answer 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/presence-gateway", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/presence-gateway"]
CMD ["serve"]
