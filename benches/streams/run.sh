#!/usr/bin/env bash
# New stream consumers against a full store, and what ingestion sees
# meanwhile (issue 16): fills a release gateway with RECORDS records (signed
# Mitel webhooks from examples/loadgen.rs, one principal each), then, while
# signed webhooks and /healthz are probed every few milliseconds
# (examples/stream_stall.rs),
#   - CONSUMERS Server-Sent Events consumers open at once without
#     Last-Event-ID and read their whole snapshot,
#   - then CONSUMERS more open with Last-Event-ID: 0 and read the whole
#     history (`[store] history` holds every change of the fill),
# and reports webhook and /healthz latency (p50/p99/max) before and while
# they do, and how long the consumers took.
#
#   bash benches/streams/run.sh                        # 300 000 and 1 000 000 records
#   RECORDS=300000 bash benches/streams/run.sh
#   BASE_BIN=/path/to/presence-gateway bash benches/streams/run.sh
#
# BASE_BIN runs the same scenarios on another build first (e.g. main's
# release binary, built in a separate target directory), so both sets of
# figures come from one run on the same machine.
#
# With taskset available, the gateway runs on CPU 0 and the clients on CPU
# 1 (PIN=0 shares both cores instead). Loopback only; bounded by RECORDS and
# the clients' timeouts; every process it starts is stopped when it ends.
# Each gateway holds RECORDS records and as many changes of history (about
# 0.5 GB at a million), more on builds that copy a snapshot per consumer.
set -euo pipefail
cd "$(dirname "$0")/../.."

RECORDS=${RECORDS:-"300000 1000000"}
CONSUMERS=${CONSUMERS:-20}
CONNECTIONS=${CONNECTIONS:-64}
PIN=${PIN:-1}
BASE_BIN=${BASE_BIN:-}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
TOKEN=streams-bench-token
ADDR=127.0.0.1:18097

server_cpu=() client_cpu=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example loadgen --example stream_stall
bin=target/release
work=$(mktemp -d)
gw=
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_ready() {
  for _ in $(seq 1 3000); do
    status=$( (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}" &&
      printf 'GET /readyz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
      head -c 12 <&3) 2>/dev/null || true)
    if [ "$status" = "HTTP/1.1 200" ]; then return 0; fi
    sleep 0.02
  done
  echo "the gateway did not become ready within 60 s" >&2
  return 1
}

# One gateway build, one store size: fill, then both kinds of opens.
scenario() { # label gateway-binary records
  local label=$1 gateway=$2 records=$3
  cat >"$work/gateway.toml" <<TOML
[server]
listen = "$ADDR"

[store]
history = $((records + 100000))

[consumers]
tokens = ["$TOKEN"]

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML
  echo "== $label: $records records"
  RUST_LOG=warn "${server_cpu[@]}" "$gateway" --config "$work/gateway.toml" >"$work/$label-$records.log" 2>&1 &
  gw=$!
  wait_ready
  "${client_cpu[@]}" "$bin/examples/loadgen" load --label "fill-$label" --addr "$ADDR" --key "$KEY" \
    --connections "$CONNECTIONS" --duration 1200 --warmup 0 --principals "$records" \
    --max-requests "$records" | grep '^RESULT'
  for open in snapshot replay; do
    local from=()
    [ "$open" = replay ] && from=(--last-event-id 0)
    "${client_cpu[@]}" "$bin/examples/stream_stall" --label "$label-$records" --addr "$ADDR" \
      --key "$KEY" --token "$TOKEN" --consumers "$CONSUMERS" "${from[@]}" | tee -a "$work/results"
  done
  echo "gateway peak RSS: $(awk '/VmHWM/ {print $2}' "/proc/$gw/status") KiB"
  kill -TERM "$gw"
  wait "$gw" || true
  gw=
  grep -E 'WARN|ERROR' "$work/$label-$records.log" | cut -c1-300 || true
}

echo "== $CONSUMERS consumers at once ($(nproc) CPUs, $(uname -r); server pinned: ${server_cpu[*]:-no})"
for records in $RECORDS; do
  if [ -n "$BASE_BIN" ]; then scenario base "$BASE_BIN" "$records"; fi
  scenario this "$bin/presence-gateway" "$records"
done

echo
echo "== summary: webhook / healthz latency while the consumers open and read (ms)"
printf '%-14s %-10s %-8s %8s %8s %9s %8s %8s %9s %12s\n' build open phase \
  hook_p50 hook_p99 hook_max hz_p50 hz_p99 hz_max consumers_ms
sed -n 's/^RESULT label=\([^ ]*\) open=\([^ ]*\) phase=\([^ ]*\) webhook n=[0-9]* p50_ms=\([0-9.]*\) p99_ms=\([0-9.]*\) max_ms=\([0-9.]*\) | healthz n=[0-9]* p50_ms=\([0-9.]*\) p99_ms=\([0-9.]*\) max_ms=\([0-9.]*\).*/\1 \2 \3 \4 \5 \6 \7 \8 \9/p' \
  "$work/results" | while read -r label open phase a b c d e f; do
  took=
  if [ "$phase" = consumers ]; then
    took=$(sed -n "s/^RESULT label=$label open=$open consumers=.* all_read_max_ms=\([0-9.]*\).*/\1/p" "$work/results")
  fi
  printf '%-14s %-10s %-8s %8s %8s %9s %8s %8s %9s %12s\n' "$label" "${open%%-from-*}" "$phase" "$a" "$b" "$c" "$d" "$e" "$f" "$took"
done
