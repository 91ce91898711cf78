#!/usr/bin/env bash
# Load harness: the gateway against bare axum and a minimal Node.js receiver,
# same requests, same client, same connection count and duration, one run.
# Loopback only; every process it starts is stopped when it ends.
#
#   bash benches/load/run.sh                 # 64 connections, 3 rounds of 8 s each
#   CONNECTIONS=128 DURATION=20 ROUNDS=5 bash benches/load/run.sh
#
# With taskset available, each server runs on CPU 0 and the client on CPU 1
# (PIN=0 shares both cores instead), so the client's work does not count
# against the server under test.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
PRINCIPALS=${PRINCIPALS:-10000}
PIN=${PIN:-1}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
GW_ADDR=127.0.0.1:18080
SINK_ADDR=127.0.0.1:18081
NODE_ADDR=127.0.0.1:18082

server_cpu=() client_cpu=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example bare_sink --example loadgen
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/gateway.toml" <<TOML
[server]
listen = "$GW_ADDR"

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML

wait_port() {
  for _ in $(seq 1 500); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.02
  done
  echo "nothing listening on $1" >&2
  return 1
}

drive() { # label addr
  "${client_cpu[@]}" "$bin/examples/loadgen" load --label "$1" --addr "$2" --key "$KEY" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" --principals "$PRINCIPALS" \
    | grep '^RESULT' | tee -a "$work/results"
}


echo "== startup time (spawn to /readyz 200, empty store)"
"$bin/examples/loadgen" startup --bin "$bin/presence-gateway" --config "$work/gateway.toml" --addr "$GW_ADDR" --runs 5

echo "== starting the servers (gateway, bare axum sink, Node.js receiver)"
RUST_LOG=warn "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw=$!; pids+=("$gw")
"${server_cpu[@]}" "$bin/examples/bare_sink" "$SINK_ADDR" >/dev/null 2>&1 &
pids+=("$!")
targets=("gateway $GW_ADDR" "sink $SINK_ADDR")
if command -v node >/dev/null; then
  "${server_cpu[@]}" node benches/load/node_receiver.js "${NODE_ADDR%:*}" "${NODE_ADDR#*:}" "$KEY" >/dev/null 2>&1 &
  pids+=("$!")
  targets+=("node $NODE_ADDR")
else
  echo "node not installed: skipping the Node.js comparator"
fi
for t in "${targets[@]}"; do wait_port "${t#* }"; done

# Rounds alternate the targets, so that a slow spell of this shared machine
# hits all of them rather than one; the summary takes each target's median.
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS ($CONNECTIONS connections, ${DURATION}s each)"
  for t in "${targets[@]}"; do drive "${t%% *}" "${t#* }"; done
done
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
echo "gateway peak RSS: ${rss_kb} KiB"

# The median of a field over a target's rounds.
field() {
  sed -n "s/^RESULT label=$1 .*$2=\([0-9.]*\).*/\1/p" "$work/results" | sort -n |
    awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo
echo "== summary: medians of $ROUNDS rounds (server pinned: ${server_cpu[*]:-no}; client pinned: ${client_cpu[*]:-no})"
printf '%-8s %10s %8s %8s %9s %7s\n' target req/s p50_us p99_us p99.9_us errors
for label in gateway sink node; do
  rps=$(field "$label" rps)
  [ -n "$rps" ] || continue
  printf '%-8s %10s %8s %8s %9s %7s\n' "$label" "$rps" "$(field "$label" p50_us)" \
    "$(field "$label" p99_us)" "$(field "$label" p999_us)" "$(field "$label" errors)"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo "throughput gateway/sink: $(ratio "$(field gateway rps)" "$(field sink rps)")  (target >= 0.90)"
echo "p99 gateway/sink:        $(ratio "$(field gateway p99_us)" "$(field sink p99_us)")  (target <= 2.00)"
if [ -n "$(field node rps)" ]; then
  echo "throughput gateway/node: $(ratio "$(field gateway rps)" "$(field node rps)")  (target >= 3.00)"
fi
