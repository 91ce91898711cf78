#!/usr/bin/env bash
# Soak (issue 16): the release gateway, persisted to a data_dir as the dev
# config runs it, under DURATION seconds (default 600) of webhooks at
# LOAD_PERCENT (default 80) of the maximum rate measured with the
# consumers attached: valid, duplicate, stale and forged requests, and 100
# stream consumers of which some are slow and some reconnect with resume
# (examples/soak.rs says exactly what it sends and checks). Prints a line
# per INTERVAL and a RESULT line: unexpected answers (valid, duplicate and
# stale must get 204, forged 401), stream gaps, RSS growth after the
# warm-up, and the spread of the per-interval p99.
#
#   bash benches/soak/run.sh
#   DURATION=60 WARMUP=20 INTERVAL=10 bash benches/soak/run.sh   # a quick look
#
# Loopback only; bounded by DURATION; every process it starts is stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-600}
WARMUP=${WARMUP:-120}
INTERVAL=${INTERVAL:-30}
LOAD_PERCENT=${LOAD_PERCENT:-80}
CONSUMERS=${CONSUMERS:-100}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
ADDR=127.0.0.1:18096

server_cpu=() client_cpu=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example soak
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

[store]
data_dir = "$work/state"

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML

"${server_cpu[@]}" target/release/presence-gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw=$!
for _ in $(seq 1 500); do
  (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}") 2>/dev/null && break
  sleep 0.02
done

echo "== soak: $DURATION s at $LOAD_PERCENT % of the measured maximum, $CONSUMERS consumers ($(nproc) CPUs, server pinned: ${server_cpu[*]:-no})"
"${client_cpu[@]}" target/release/examples/soak --addr "$ADDR" --key "$KEY" --pid "$gw" \
  --consumers "$CONSUMERS" --duration "$DURATION" --warmup "$WARMUP" --interval "$INTERVAL" \
  --load-percent "$LOAD_PERCENT"
echo "gateway warnings and errors:"
sed 's/\x1b\[[0-9;]*m//g' "$work/gateway.log" | grep -E 'WARN|ERROR' | cut -c1-200 | sort | uniq -c | sort -rn | head -20 || true
kill -TERM "$gw"
wait "$gw" && echo "gateway exit status 0"
gw=
