#!/usr/bin/env bash
# Cross-replica delivery bench: two release gateways (A and B) on one Redis
# store (`backend = "redis"`, one key prefix of this run's own), CLIENTS
# Server-Sent Events streams open on B, CHANGES signed webhooks posted to A
# one at a time; for every change, the time from the request's start until
# each of B's streams has read it (DESIGN §8: p99 <= 100 ms on loopback).
#
#   bash benches/replicas/run.sh                 # 1 000 streams, 200 changes
#   CLIENTS=200 CHANGES=50 bash benches/replicas/run.sh
#   RAW=/tmp/replicas.txt bash benches/replicas/run.sh   # also keep every change's line
#
# REDIS_URL (default redis://127.0.0.1:6379/0) must be on loopback; the
# run's keys are deleted at the end (redis-cli is needed for that). Every
# process it starts is stopped when it ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLIENTS=${CLIENTS:-1000}
CHANGES=${CHANGES:-200}
LOCAL=${LOCAL:-1}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
TOKEN=replicas-token
A_ADDR=127.0.0.1:18091
B_ADDR=127.0.0.1:18092
# Unique per run, without glob characters (the clean-up scans for it).
PREFIX=bench-replicas-$$-$(date +%s)

host_port=${REDIS_URL#*://}; host_port=${host_port%%/*}; host_port=${host_port##*@}
case "$host_port" in
  127.0.0.1 | 127.0.0.1:* | localhost | localhost:* | "[::1]" | "[::1]:"*) ;;
  *) echo "REDIS_URL must be on loopback" >&2; exit 1 ;;
esac
command -v redis-cli >/dev/null || { echo "redis-cli is needed (to delete the run's keys)" >&2; exit 1; }
[ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" = PONG ] || { echo "no Redis answering at $REDIS_URL" >&2; exit 1; }

# B holds one descriptor per stream, and so does the client.
ulimit -n $((CLIENTS + LOCAL + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((CLIENTS + LOCAL + 64)) ]; then
  echo "open-file limit $(ulimit -n) is too low for $CLIENTS streams" >&2
  exit 1
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example replicas
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Both gateways have stopped: nothing writes under the prefix any more.
  redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" |
    xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
  echo "redis keys under $PREFIX deleted ($(redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX:*" | wc -l) left)"
  rm -rf "$work"
}
trap cleanup EXIT

for replica in a b; do
  addr=$A_ADDR; [ "$replica" = b ] && addr=$B_ADDR
  cat >"$work/$replica.toml" <<TOML
[server]
listen = "$addr"
replica_id = "bench-$replica"

[store]
backend = "redis"

[store.redis]
url = "$REDIS_URL"
key_prefix = "$PREFIX"

[consumers]
tokens = ["$TOKEN"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML
  RUST_LOG=warn "$bin/presence-gateway" --config "$work/$replica.toml" >"$work/$replica.log" 2>&1 &
  pids+=("$!")
done

wait_ready() {
  for _ in $(seq 1 500); do
    status=$( (exec 3<>"/dev/tcp/${1%:*}/${1#*:}" &&
      printf 'GET /readyz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
      head -c 12 <&3) 2>/dev/null || true)
    if [ "$status" = "HTTP/1.1 200" ]; then return 0; fi
    sleep 0.02
  done
  echo "$1 did not become ready" >&2
  return 1
}
wait_ready "$A_ADDR"
wait_ready "$B_ADDR"

echo "== A $A_ADDR, B $B_ADDR, Redis $REDIS_URL prefix $PREFIX; $CLIENTS streams on B, $LOCAL on A, $CHANGES changes ($(nproc) CPUs, $(uname -r))"
timeout 600 "$bin/examples/replicas" --a "$A_ADDR" --b "$B_ADDR" --key "$KEY" --token "$TOKEN" \
  --clients "$CLIENTS" --local "$LOCAL" --changes "$CHANGES" >"$work/out"
grep -v '^RESULT change=' "$work/out"
if [ -n "${RAW:-}" ]; then cp "$work/out" "$RAW"; fi
# The slowest changes, for a look at the tail.
echo "-- the 3 changes whose last stream on B took longest:"
grep '^RESULT change=' "$work/out" | sort -t= -k7 -g | tail -n 3 || true
for replica in a b; do
  if grep -q -v 'consumers.tokens' "$work/$replica.log"; then
    echo "-- replica $replica log:"; tail -n 5 "$work/$replica.log"
  fi
done
