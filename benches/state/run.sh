#!/usr/bin/env bash
# Persisted state at scale (the memory backend with `[store] data_dir`):
# fills a fresh data_dir with RECORDS records through the release gateway
# itself (RECORDS signed Mitel webhooks from examples/loadgen.rs, one per
# principal, so RECORDS principals), stops it with SIGTERM, and reports
#   - bytes on disk per record right after the load (journal segments, and
#     any snapshot the compactor wrote meanwhile),
#   - the time from spawning the gateway to `/readyz` 200 on that directory
#     (RUNS times, each on a fresh copy, so every run loads the same files),
#   - the same two after a start-up has folded the journal into a snapshot.
#
#   bash benches/state/run.sh                    # 1 000 000 records, 3 start-ups each
#   RECORDS=100000 RUNS=5 bash benches/state/run.sh
#   KEEP=/tmp/state-1m bash benches/state/run.sh   # also keep the filled data_dir there
#   DEDUP_WINDOW_SECS=1 bash benches/state/run.sh   # snapshots without the event ids
#
# Every webhook's event id is journaled too, and kept in snapshots while it
# is inside `[store] dedup_window_secs` (default 600); DEDUP_WINDOW_SECS sets
# that window, so a short one shows a snapshot's size once the ids expired.
#
# The copies are made just before each start, so the files are in the page
# cache (a warm restart). Loopback only; the load is bounded by RECORDS and
# every process it starts is stopped when it ends. Needs about 4 × the
# data_dir's size in the temporary directory (TMPDIR).
set -euo pipefail
cd "$(dirname "$0")/../.."

RECORDS=${RECORDS:-1000000}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-64}
PIN=${PIN:-1}
DEDUP_WINDOW_SECS=${DEDUP_WINDOW_SECS:-}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
ADDR=127.0.0.1:18095

server_cpu=() client_cpu=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example loadgen
bin=target/release
work=$(mktemp -d)
gw=
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

config() { # data_dir
  cat <<TOML
[server]
listen = "$ADDR"

[store]
data_dir = "$1"
${DEDUP_WINDOW_SECS:+dedup_window_secs = $DEDUP_WINDOW_SECS}

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML
}

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

# SIGTERM, then wait (at most 60 s) for the exit; prints how long it took.
stop_gateway() {
  local started=$EPOCHREALTIME
  kill -TERM "$gw"
  for _ in $(seq 1 600); do
    kill -0 "$gw" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$gw" 2>/dev/null; then
    echo "the gateway did not stop within 60 s of SIGTERM; killing it" >&2
    kill -KILL "$gw"
  fi
  wait "$gw" || echo "gateway exit status $?"
  gw=
  awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "stopped %.2f s after SIGTERM\n", b - a }'
}

# The files of a data_dir, their total size and the size per record.
sizes() { # dir label
  echo "-- $2: files"
  (cd "$1" && find . -type f ! -name LOCK -printf '%10s  %f\n' | sort -k2)
  local bytes allocated
  bytes=$(find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  allocated=$(du -sk "$1" | cut -f1)
  awk -v b="$bytes" -v k="$allocated" -v r="$RECORDS" -v l="$2" 'BEGIN {
    printf "RESULT disk state=%s bytes=%d allocated_kib=%d records=%d bytes_per_record=%.1f\n", l, b, k, r, b / r }'
}

# Spawn to /readyz 200, RUNS times, each on a fresh copy of `dir`.
startups() { # dir label
  config "$work/run" >"$work/run.toml"
  : >"$work/startup-$2.log"
  for i in $(seq 1 "$RUNS"); do
    rm -rf "$work/run"
    cp -a "$1" "$work/run"
    RUST_LOG=info "$bin/examples/loadgen" startup --bin "$bin/presence-gateway" --config "$work/run.toml" \
      --addr "$ADDR" --runs 1 --timeout-secs 60 --log "$work/startup-$2.log" |
      sed "s/^RESULT label=startup/RESULT startup state=$2 run=$i/"
  done
  # The gateway's own account of loading the files (the rest of the start
  # is process start, config and binding).
  echo "gateway log, 'persisted state loaded' (reading the files into the store), per run:" \
    "$(sed 's/\x1b\[[0-9;]*m//g' "$work/startup-$2.log" | grep 'persisted state loaded' |
      grep -o 'elapsed_ms=[0-9]*' | paste -sd' ')"
  rm -rf "$work/run"
}

echo "== filling a data_dir with $RECORDS records ($CONNECTIONS connections; dedup window ${DEDUP_WINDOW_SECS:-600 (default)} s;" \
  "$(nproc) CPUs, $(uname -r); server pinned: ${server_cpu[*]:-no})"
config "$work/data" >"$work/fill.toml"
RUST_LOG=info "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/fill.toml" >"$work/fill.log" 2>&1 &
gw=$!
wait_ready
"${client_cpu[@]}" "$bin/examples/loadgen" load --label fill --addr "$ADDR" --key "$KEY" \
  --connections "$CONNECTIONS" --duration 1200 --warmup 0 --principals "$RECORDS" \
  --max-requests "$RECORDS" | grep '^RESULT'
echo "gateway peak RSS: $(awk '/VmHWM/ {print $2}' "/proc/$gw/status") KiB"
stop_gateway
sed 's/\x1b\[[0-9;]*m//g' "$work/fill.log" | grep -E 'compacted|shutdown requested|stopped$|WARN|ERROR' | cut -c1-300 || true
mv "$work/data" "$work/after-load"
if [ -n "${KEEP:-}" ]; then
  rm -rf "$KEEP" && cp -a "$work/after-load" "$KEEP" && echo "the filled data_dir is kept in $KEEP"
fi
sizes "$work/after-load" after-load
# Its parts: the newest snapshot (as the compactor logged it) holds the
# first `records` principals; every principal was written once, so the
# segments left hold the rest, one webhook each.
last=$(sed 's/\x1b\[[0-9;]*m//g' "$work/fill.log" | grep 'compacted into a snapshot' | tail -n 1 || true)
snap_records=$(sed -n 's/.* records=\([0-9]*\).*/\1/p' <<<"$last")
snap_bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$last")
journal_bytes=$(find "$work/after-load" -name 'journal-*.log' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
if [ -n "$snap_records" ]; then
  awk -v b="$snap_bytes" -v r="$snap_records" 'BEGIN {
    printf "RESULT disk part=snapshot bytes=%d records=%d bytes_per_record=%.1f\n", b, r, b / r }'
fi
awk -v b="$journal_bytes" -v r="$((RECORDS - ${snap_records:-0}))" 'BEGIN {
  if (r > 0) printf "RESULT disk part=journal bytes=%d webhooks=%d bytes_per_webhook=%.1f\n", b, r, b / r }'
startups "$work/after-load" after-load

# A start-up folds the segments left from the last run into a snapshot when
# they hold at least a segment's worth (64 MiB; the writer rotates, and the
# compactor folds, at that size during the load too).
journal_bytes=$(find "$work/after-load" -name 'journal-*.log' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
if [ "$journal_bytes" -lt $((64 * 1024 * 1024)) ]; then
  echo "== no compaction at start-up: the journal left ($journal_bytes bytes) is below a segment (64 MiB)"
  exit 0
fi
echo "== folding the journal into a snapshot (a start-up on the same files)"
cp -a "$work/after-load" "$work/compacted"
config "$work/compacted" >"$work/compact.toml"
RUST_LOG=info "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/compact.toml" >"$work/compact.log" 2>&1 &
gw=$!
wait_ready
for _ in $(seq 1 1200); do
  grep -q 'compacted into a snapshot' "$work/compact.log" && break
  sleep 0.1
done
stop_gateway
sed 's/\x1b\[[0-9;]*m//g' "$work/compact.log" | grep -E 'persisted state loaded|compacted|WARN|ERROR' | cut -c1-300 || true
sizes "$work/compacted" compacted
startups "$work/compacted" compacted
