#!/usr/bin/env bash
# Load harness: the gateway against bare axum and a minimal Node.js receiver,
# same requests, same client, same connection count and duration, one run.
# Loopback only; every process it starts is stopped when it ends.
#
#   bash benches/load/run.sh                 # 64 connections, 3 rounds of 8 s each
#   CONNECTIONS=128 DURATION=20 ROUNDS=5 bash benches/load/run.sh
#   STORES=1 bash benches/load/run.sh        # also the gateway with data_dir and with Redis
#   STANDARD=0 bash benches/load/run.sh      # without the Standard Webhooks rounds
#   PEOPLE=1 bash benches/load/run.sh        # also the gateway with 100 000 people
#
# The gateway has two sources: `mitel` (what the `gateway` rounds send) and
# `standard`, a Standard Webhooks source (`kind = "standard"`) that the
# `standard` rounds drive on the same gateway process with signed Standard
# Webhooks events (webhook-id, webhook-timestamp, webhook-signature; a fresh
# id and the current second on every request). Both print the gateway's CPU
# per request, side by side. Every round sends event ids of its own and
# current timestamps, so no round is answered from the duplicate table;
# the gateway's event counters per source are printed at the end to show it.
#
# STORES=1 adds two more gateways to the same alternating rounds: one with
# `[store] data_dir` (a temporary directory: journal and snapshots) and one
# with `backend = "redis"` on REDIS_URL (default redis://127.0.0.1:6379/0,
# loopback only) under a key prefix of its own, whose keys are deleted at the
# end (redis-cli is needed for that; without it the Redis rounds are
# skipped). It prints their throughput against the gateway without
# persistence.
#
# PEOPLE=1 adds a gateway with a `[people]` mapping of $PEOPLE_COUNT people
# (default 100 000) with three identities each: the principal the Mitel
# rounds send, the same principal on the Standard Webhooks source, and one
# on Mitel that never changes; so every event of the `people` rounds is an
# identity change whose person is derived again (and, most of the time,
# changes). It prints its throughput and CPU per request against the
# gateway without people (target: at most 10 % more per webhook).
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
STORES=${STORES:-0}
STANDARD=${STANDARD:-1}
PEOPLE=${PEOPLE:-0}
PEOPLE_COUNT=${PEOPLE_COUNT:-100000}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
# The public Standard Webhooks test secret (tests/fixtures/keys.toml).
STANDARD_KEY=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
GW_ADDR=127.0.0.1:18080
SINK_ADDR=127.0.0.1:18081
NODE_ADDR=127.0.0.1:18082
JOURNAL_ADDR=127.0.0.1:18083
REDIS_GW_ADDR=127.0.0.1:18084
PEOPLE_ADDR=127.0.0.1:18085
# Unique per run, without glob characters (the clean-up scans for it).
REDIS_PREFIX=bench-load-$$-$(date +%s)

server_cpu=() client_cpu=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example bare_sink --example loadgen
bin=target/release
work=$(mktemp -d)
pids=()
redis_used=0
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$redis_used" = 1 ]; then
    # The gateway has stopped: nothing writes under the prefix any more.
    redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX:*" |
      xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null || true
    left=$(redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX:*" | wc -l)
    echo "redis keys under $REDIS_PREFIX deleted ($left left)"
  fi
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

[[sources]]
id = "standard"
kind = "standard"
signing_keys = ["$STANDARD_KEY"]
TOML

wait_port() {
  for _ in $(seq 1 500); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.02
  done
  echo "nothing listening on $1" >&2
  return 1
}

# A Redis-backed gateway listens before it can write (it answers 503 until
# Redis is reachable), so the gateways are waited for by /readyz.
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

# CPU seconds (user + system, every thread) a process has used so far.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }
redis_cpu_secs() {
  redis-cli -u "$REDIS_URL" info cpu | tr -d '\r' |
    awk -F: '$1 == "used_cpu_sys" || $1 == "used_cpu_user" { s += $2 } END { printf "%.3f", s }'
}

# One round of one target. Besides what the load generator prints, the
# server's CPU time per request over the measured part (cpu_us; for the
# Redis target also Redis' own, redis_cpu_us, which other users of a shared
# server add to): unlike requests/s, it hardly moves when other work on this
# machine takes the server's core away.
declare -A pid_of=()
drive() { # label addr
  local pid=${pid_of[$1]:-} cpu0='' redis0='' line requests sender
  if [ "$1" = standard ]; then
    sender=(--kind standard --path /webhooks/standard --key "$STANDARD_KEY")
  else
    sender=(--key "$KEY")
  fi
  "${client_cpu[@]}" "$bin/examples/loadgen" load --label "$1" --addr "$2" "${sender[@]}" \
    --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" --principals "$PRINCIPALS" \
    >"$work/round" &
  local load=$!
  sleep "$WARMUP"
  if [ -n "$pid" ]; then cpu0=$(cpu_secs "$pid"); fi
  if [ "$1" = redis ]; then redis0=$(redis_cpu_secs); fi
  wait "$load"
  line=$(grep '^RESULT' "$work/round")
  requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
  if [ -n "$cpu0" ] && [ "${requests:-0}" -gt 0 ]; then
    line+=$(awk -v a="$cpu0" -v b="$(cpu_secs "$pid")" -v n="$requests" 'BEGIN { printf " cpu_us=%.2f", (b - a) * 1e6 / n }')
  fi
  if [ -n "$redis0" ] && [ "${requests:-0}" -gt 0 ]; then
    line+=$(awk -v a="$redis0" -v b="$(redis_cpu_secs)" -v n="$requests" 'BEGIN { printf " redis_cpu_us=%.2f", (b - a) * 1e6 / n }')
  fi
  echo "$line" | tee -a "$work/results"
}


echo "== startup time (spawn to /readyz 200, empty store)"
"$bin/examples/loadgen" startup --bin "$bin/presence-gateway" --config "$work/gateway.toml" --addr "$GW_ADDR" --runs 5

echo "== starting the servers (gateway, bare axum sink, Node.js receiver)"
RUST_LOG=warn "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw=$!; pids+=("$gw"); pid_of[gateway]=$gw
"${server_cpu[@]}" "$bin/examples/bare_sink" "$SINK_ADDR" >/dev/null 2>&1 &
pids+=("$!"); pid_of[sink]=$!
targets=("gateway $GW_ADDR")
if [ "$STANDARD" = 1 ]; then
  pid_of[standard]=$gw
  targets+=("standard $GW_ADDR")
fi
targets+=("sink $SINK_ADDR")
if command -v node >/dev/null; then
  "${server_cpu[@]}" node benches/load/node_receiver.js "${NODE_ADDR%:*}" "${NODE_ADDR#*:}" "$KEY" >/dev/null 2>&1 &
  pids+=("$!"); pid_of[node]=$!
  targets+=("node $NODE_ADDR")
else
  echo "node not installed: skipping the Node.js comparator"
fi
if [ "$STORES" = 1 ]; then
  sed -e "s/$GW_ADDR/$JOURNAL_ADDR/" "$work/gateway.toml" >"$work/journal.toml"
  printf '\n[store]\ndata_dir = "%s"\n' "$work/data" >>"$work/journal.toml"
  RUST_LOG=warn "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/journal.toml" >"$work/journal.log" 2>&1 &
  journal_gw=$!; pids+=("$journal_gw"); pid_of[journal]=$journal_gw
  targets+=("journal $JOURNAL_ADDR")
  host_port=${REDIS_URL#*://}; host_port=${host_port%%/*}; host_port=${host_port##*@}
  case "$host_port" in
    127.0.0.1 | 127.0.0.1:* | localhost | localhost:* | "[::1]" | "[::1]:"*) redis_local=1 ;;
    *) redis_local=0 ;;
  esac
  if ! command -v redis-cli >/dev/null; then
    echo "redis-cli not installed: skipping the Redis rounds (it deletes the run's keys)"
  elif [ "$redis_local" != 1 ]; then
    echo "REDIS_URL is not on loopback: skipping the Redis rounds"
  elif [ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" != PONG ]; then
    echo "no Redis answering at $REDIS_URL: skipping the Redis rounds"
  else
    redis_used=1
    sed -e "s/$GW_ADDR/$REDIS_GW_ADDR/" "$work/gateway.toml" >"$work/redis.toml"
    printf '\n[store]\nbackend = "redis"\n\n[store.redis]\nurl = "%s"\nkey_prefix = "%s"\n' \
      "$REDIS_URL" "$REDIS_PREFIX" >>"$work/redis.toml"
    RUST_LOG=warn "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/redis.toml" >"$work/redis.log" 2>&1 &
    pids+=("$!"); pid_of[redis]=$!
    targets+=("redis $REDIS_GW_ADDR")
    echo "redis rounds on $REDIS_URL, key prefix $REDIS_PREFIX (Redis itself is not pinned)"
  fi
fi
if [ "$PEOPLE" = 1 ]; then
  # Person n: the Mitel rounds' principal n on both sources, and one more.
  awk -v n="$PEOPLE_COUNT" 'BEGIN {
    for (p = 0; p < n; p++) {
      id = sprintf("%08x-5a9e-4a57-9d1e-%012x", p, p)
      printf "[[person]]\nid = \"person-%d\"\nname = \"Person %d\"\nidentities = [\n", p, p
      printf "  { source = \"mitel\", principal = \"%s\" },\n", id
      printf "  { source = \"standard\", principal = \"%s\" },\n", id
      printf "  { source = \"mitel\", principal = \"desk-%d\" },\n]\n", p
    }
  }' >"$work/people.toml"
  sed -e "s/$GW_ADDR/$PEOPLE_ADDR/" "$work/gateway.toml" >"$work/people-gateway.toml"
  printf '\n[people]\nfile = "%s"\n' "$work/people.toml" >>"$work/people-gateway.toml"
  RUST_LOG=warn "${server_cpu[@]}" "$bin/presence-gateway" --config "$work/people-gateway.toml" >"$work/people.log" 2>&1 &
  people_gw=$!; pids+=("$people_gw"); pid_of[people]=$people_gw
  targets+=("people $PEOPLE_ADDR")
  echo "people rounds: $PEOPLE_COUNT people x 3 identities ($(du -h "$work/people.toml" | cut -f1) file)"
fi
for t in "${targets[@]}"; do wait_port "${t#* }"; done
for t in "${targets[@]}"; do
  case "$t" in gateway* | journal* | redis* | people*) wait_ready "${t#* }" ;; esac
done

# Rounds alternate the targets, so that a slow spell of this shared machine
# hits all of them rather than one; the summary takes each target's median.
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS ($CONNECTIONS connections, ${DURATION}s each)"
  for t in "${targets[@]}"; do drive "${t%% *}" "${t#* }"; done
done
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
echo "gateway peak RSS: ${rss_kb} KiB"
# What the gateway did with the events, per source: fresh ones are
# `changed` (or `refreshed`); `duplicate` or `stale` would mean rounds
# measured a shortcut.
echo "gateway events by source and result (from /metrics):"
(exec 3<>"/dev/tcp/${GW_ADDR%:*}/${GW_ADDR#*:}" &&
  printf 'GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
  cat <&3) 2>/dev/null | tr -d '\r' | grep '^presence_gateway_events' | sed 's/^/  /' || true
if [ "$STORES" = 1 ]; then
  echo "journal gateway peak RSS: $(awk '/VmHWM/ {print $2}' "/proc/$journal_gw/status") KiB;" \
    "data_dir: $(du -sb "$work/data" | cut -f1) bytes in $(find "$work/data" -type f | wc -l) files"
  for log in journal redis; do
    if [ -s "$work/$log.log" ]; then echo "-- $log gateway log (warnings):"; tail -n 5 "$work/$log.log"; fi
  done
fi

# The median of a field over a target's rounds.
field() {
  sed -n "s/^RESULT label=$1 \(.* \)\?$2=\([0-9.]*\).*/\2/p" "$work/results" | sort -n |
    awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo
echo "== summary: medians of $ROUNDS rounds (server pinned: ${server_cpu[*]:-no}; client pinned: ${client_cpu[*]:-no})"
printf '%-8s %10s %8s %8s %9s %7s\n' target req/s p50_us p99_us p99.9_us errors
for label in gateway standard sink node journal redis people; do
  rps=$(field "$label" rps)
  [ -n "$rps" ] || continue
  printf '%-8s %10s %8s %8s %9s %7s\n' "$label" "$rps" "$(field "$label" p50_us)" \
    "$(field "$label" p99_us)" "$(field "$label" p999_us)" "$(field "$label" errors)"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
# Each round's a/b throughput ratio (a and b ran seconds apart), as
# "median (min-max)": steadier than the ratio of medians when this shared
# machine's speed drifts during a run.
paired() {
  sed -n "s/^RESULT label=\($1\|$2\) rps=\([0-9.]*\).*/\1 \2/p" "$work/results" |
    awk -v a="$1" -v b="$2" '
      $1 == a { x[++na] = $2 } $1 == b { y[++nb] = $2 }
      END {
        n = (na < nb) ? na : nb
        for (i = 1; i <= n; i++) if (y[i] > 0) r[++m] = x[i] / y[i]
        if (!m) { print "n/a"; exit }
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
        med = (m % 2) ? r[(m + 1) / 2] : (r[m / 2] + r[m / 2 + 1]) / 2
        printf "%.2f (%.2f-%.2f)", med, r[1], r[m]
      }'
}
echo "throughput gateway/sink: $(ratio "$(field gateway rps)" "$(field sink rps)")  (target >= 0.90)"
echo "p99 gateway/sink:        $(ratio "$(field gateway p99_us)" "$(field sink p99_us)")  (target <= 2.00)"
if [ -n "$(field node rps)" ]; then
  echo "throughput gateway/node: $(ratio "$(field gateway rps)" "$(field node rps)")  (target >= 3.00)"
fi
echo
if [ -n "$(field standard rps)" ]; then
  echo "throughput standard/gateway (Standard Webhooks / Mitel, same gateway): $(ratio "$(field standard rps)" "$(field gateway rps)")"
  echo "  per round, median (range): $(paired standard gateway)"
  echo "p99 standard/gateway:    $(ratio "$(field standard p99_us)" "$(field gateway p99_us)")"
  echo "bodies: standard $(field standard body_bytes) B, Mitel $(field gateway body_bytes) B"
fi
echo
echo "== server CPU per request (µs, medians; the journal's writer and compactor threads included)"
for label in gateway standard sink node journal redis people; do
  cpu=$(field "$label" cpu_us)
  [ -n "$cpu" ] || continue
  extra=
  if [ -n "$(field "$label" redis_cpu_us)" ]; then extra="  + Redis $(field "$label" redis_cpu_us)"; fi
  printf '%-8s %8s%s\n' "$label" "$cpu" "$extra"
done
if [ -n "$(field standard cpu_us)" ]; then
  echo "CPU per request standard/gateway (Standard Webhooks / Mitel): $(ratio "$(field standard cpu_us)" "$(field gateway cpu_us)")"
fi
echo
echo "== client (load generator, on its own CPU when pinned): µs per request, medians"
printf '%-8s %9s %14s\n' target build_us client_cpu_us
for label in gateway standard sink node journal redis; do
  build=$(field "$label" build_us)
  [ -n "$build" ] || continue
  printf '%-8s %9s %14s\n' "$label" "$build" "$(field "$label" client_cpu_us)"
done
if [ -n "$(field journal rps)" ]; then
  echo "throughput journal/gateway (data_dir / no persistence): $(ratio "$(field journal rps)" "$(field gateway rps)")  (target >= 0.90)"
  echo "  per round, median (range): $(paired journal gateway)"
  echo "p99 journal/gateway:     $(ratio "$(field journal p99_us)" "$(field gateway p99_us)")"
  echo "CPU per request gateway/journal (the throughput ratio on a core of its own): $(ratio "$(field gateway cpu_us)" "$(field journal cpu_us)")"
fi
if [ -n "$(field redis rps)" ]; then
  echo "throughput redis/gateway (Redis / no persistence): $(ratio "$(field redis rps)" "$(field gateway rps)")  (target >= 0.50)"
  echo "  per round, median (range): $(paired redis gateway)"
  echo "p99 redis/gateway:       $(ratio "$(field redis p99_us)" "$(field gateway p99_us)")"
  echo "CPU per request gateway/redis, gateway/(redis + Redis): $(ratio "$(field gateway cpu_us)" "$(field redis cpu_us)")," \
    "$(ratio "$(field gateway cpu_us)" "$(awk -v a="$(field redis cpu_us)" -v b="$(field redis redis_cpu_us)" 'BEGIN { print a + b }')")"
fi
if [ -n "$(field people rps)" ]; then
  echo "throughput people/gateway (100k people mapped / none): $(ratio "$(field people rps)" "$(field gateway rps)")"
  echo "  per round, median (range): $(paired people gateway)"
  echo "CPU per request people/gateway (target <= 1.10): $(ratio "$(field people cpu_us)" "$(field gateway cpu_us)")"
  echo "people gateway peak RSS: $(awk '/VmHWM/ {print $2}' "/proc/$people_gw/status") KiB (gateway without people: ${rss_kb} KiB)"
  (exec 3<>"/dev/tcp/${PEOPLE_ADDR%:*}/${PEOPLE_ADDR#*:}" &&
    printf 'GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
    cat <&3) 2>/dev/null | tr -d '\r' | grep '^presence_gateway_person' | sed 's/^/  /' || true
fi
