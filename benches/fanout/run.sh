#!/usr/bin/env bash
# Fan-out bench: CLIENTS concurrent Server-Sent Events streams on one
# gateway (loopback), its memory per idle stream, and the delivery time of
# one change to all of them (CHANGES changes, one at a time).
#
#   bash benches/fanout/run.sh                  # 10 000 clients, 5 changes
#   CLIENTS=2000 CHANGES=10 bash benches/fanout/run.sh
#
# Every process it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLIENTS=${CLIENTS:-10000}
CHANGES=${CHANGES:-5}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
TOKEN=fanout-token
ADDR=127.0.0.1:18090

# Each side holds one descriptor per stream.
ulimit -n $((CLIENTS + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((CLIENTS + 64)) ]; then
  echo "open-file limit $(ulimit -n) is too low for $CLIENTS clients" >&2
  exit 1
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example fanout
bin=target/release
work=$(mktemp -d)
gw=
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/gateway.toml" <<TOML
[server]
listen = "$ADDR"

[consumers]
tokens = ["$TOKEN"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML

RUST_LOG=warn "$bin/presence-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw=$!
for _ in $(seq 1 500); do
  (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}") 2>/dev/null && break
  sleep 0.02
done

echo "== $CLIENTS SSE clients, $CHANGES changes ($(nproc) CPUs, $(uname -r))"
timeout 600 "$bin/examples/fanout" --addr "$ADDR" --pid "$gw" --key "$KEY" --token "$TOKEN" \
  --clients "$CLIENTS" --changes "$CHANGES"
