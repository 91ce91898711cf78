#!/usr/bin/env bash
# The network edge under attack: signed webhooks at a steady rate while a
# keyless attacker holds connections open, side by side with the same load
# on an idle gateway, in one run. Loopback only; every process it starts is
# stopped when it ends; each attack lasts a bounded time.
#
#   bash benches/edge/run.sh
#   BASELINE=/path/to/older/presence-gateway bash benches/edge/run.sh
#   RATE=2000 CONNECTIONS=16 DURATION=10 bash benches/edge/run.sh
#
# Phases, each measuring signed webhooks (examples/loadgen.rs, paced to
# RATE requests/s over CONNECTIONS keep-alive connections) for DURATION s:
#   idle         nothing else
#   slow-body    SLOW_BODY connections over 20 source addresses, each a
#                webhook head with a fake signature and one body byte every
#                2 s (examples/edge_attack.rs --mode slow-body); every
#                attacking connection the gateway ends is opened again
#                half a second later
#   slowloris    SLOWLORIS connections sending one header line every 2 s
#   big-headers  SLOWLORIS connections, each 300 KB of a head never finished
#                (sent once per connection: a connection the gateway ends
#                is not opened again, so that this stays a memory attack
#                and does not become a bandwidth flood)
#   capped       (this build only) a gateway with max_connections = CAP,
#                the webhook connections opened first, then SLOWLORIS
#                slow-header connections: how many are refused at once, and
#                the most descriptors the gateway held
# For each: webhook success rate and p99 (and the ratio to idle), the
# gateway's resident memory before and at the end of the attack, and what
# the attacker saw. BASELINE runs the first four phases against another
# binary too (e.g. a build of an older commit), for the figures before and
# after a change.
#
# With taskset available, the gateway runs on CPU 0 and the clients on
# CPU 1 (PIN=0 shares both cores instead).
set -euo pipefail
cd "$(dirname "$0")/../.."

RATE=${RATE:-2000}
CONNECTIONS=${CONNECTIONS:-16}
DURATION=${DURATION:-10}
SLOW_BODY=${SLOW_BODY:-1100}
SLOWLORIS=${SLOWLORIS:-2000}
CAP=${CAP:-1000}
PIN=${PIN:-1}
BASELINE=${BASELINE:-}
KEY=829e823f-f27e-47ee-a101-5d5e9c6266bf
ADDR=127.0.0.1:18090
# The attack runs this much longer than the measurement (ramp-up first).
RAMP=4

server_cpu=() client_cpu=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0) client_cpu=(taskset -c 1)
fi
if [ "$(ulimit -n)" -lt $((SLOWLORIS + SLOW_BODY + 1000)) ]; then
  ulimit -n $((SLOWLORIS + SLOW_BODY + 1000)) 2>/dev/null || {
    echo "ulimit -n is $(ulimit -n): too low for $SLOWLORIS attacking connections" >&2
    exit 1
  }
fi

echo "== building (release)"
cargo build --release --locked --quiet --bin presence-gateway --example loadgen --example edge_attack
bin=target/release
work=$(mktemp -d)
gw_pid=
cleanup() {
  if [ -n "$gw_pid" ]; then kill "$gw_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

write_config() { # file [extra server keys]
  cat >"$1" <<TOML
[server]
listen = "$ADDR"
$2

[[sources]]
id = "mitel"
kind = "mitel"
signing_keys = ["$KEY"]
TOML
}

start_gateway() { # binary config
  RUST_LOG=warn "${server_cpu[@]}" "$1" --config "$2" >>"$work/gateway.log" 2>&1 &
  gw_pid=$!
  for _ in $(seq 1 500); do
    status=$( (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}" &&
      printf 'GET /readyz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
      head -c 12 <&3) 2>/dev/null || true)
    if [ "$status" = "HTTP/1.1 200" ]; then return 0; fi
    sleep 0.02
  done
  echo "the gateway did not become ready" >&2
  exit 1
}

stop_gateway() {
  kill "$gw_pid" 2>/dev/null || true
  wait "$gw_pid" 2>/dev/null || true
  gw_pid=
  # The port is free again once nothing listens.
  for _ in $(seq 1 500); do
    (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}") 2>/dev/null || return 0
    sleep 0.02
  done
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$gw_pid/status"; }
peak_kib() { awk '/^VmHWM/ {print $2}' "/proc/$gw_pid/status"; }
fds() { ls "/proc/$gw_pid/fd" 2>/dev/null | wc -l; }
metric() { # name
  (exec 3<>"/dev/tcp/${ADDR%:*}/${ADDR#*:}" &&
    printf 'GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n' >&3 &&
    cat <&3) 2>/dev/null | awk -v n="$1" '$1 == n {print $2}'
}

# Signed webhooks at RATE for DURATION s after 1 s of warm-up.
measure() { # label
  "${client_cpu[@]}" "$bin/examples/loadgen" load --label "$1" --addr "$ADDR" --key "$KEY" \
    --connections "$CONNECTIONS" --rate "$RATE" --duration "$DURATION" --warmup 1 |
    grep '^RESULT'
}

# An attack in the background for the measurement and its ramp-up.
attack() { # mode connections out-file [extra args]
  local mode=$1 n=$2 out=$3
  shift 3
  "${client_cpu[@]}" "$bin/examples/edge_attack" --mode "$mode" --addr "$ADDR" --connections "$n" \
    --addresses 20 --interval-ms 2000 --duration $((DURATION + RAMP + 2)) "$@" >"$out" &
}

# Samples the gateway's descriptors every 200 ms while a file is absent.
sample_fds() { # stop-file out-file
  local most=0 now
  while [ ! -e "$1" ]; do
    now=$(fds)
    if [ "$now" -gt "$most" ]; then most=$now; fi
    sleep 0.2
  done
  echo "$most" >"$2"
}

# Each phase on a fresh gateway, so that its memory figures are its own.
phases() { # target-label binary
  local t=$1 bin_gw=$2 rss0 out attacker
  write_config "$work/gateway.toml" ""
  start_gateway "$bin_gw" "$work/gateway.toml"
  measure "$t:idle" | tee -a "$work/results"
  echo "MEMORY label=$t:idle rss_before_kib=$(rss_kib) rss_during_kib=$(rss_kib) rss_peak_kib=$(peak_kib) fds=$(fds)" |
    tee -a "$work/results"
  stop_gateway

  for phase in slow-body slowloris big-headers; do
    case $phase in
      slow-body) mode=slow-body n=$SLOW_BODY extra=(--reconnect-ms 500) ;;
      slowloris) mode=slow-headers n=$SLOWLORIS extra=(--reconnect-ms 500) ;;
      big-headers) mode=big-headers n=$SLOWLORIS extra=(--header-bytes 307200 --reconnect-ms 600000) ;;
    esac
    start_gateway "$bin_gw" "$work/gateway.toml"
    rss0=$(rss_kib)
    out="$work/attack-$t-$phase"
    attack "$mode" "$n" "$out" "${extra[@]}"
    attacker=$!
    sleep "$RAMP"
    measure "$t:$phase" | tee -a "$work/results"
    echo "MEMORY label=$t:$phase rss_before_kib=$rss0 rss_during_kib=$(rss_kib) rss_peak_kib=$(peak_kib) fds=$(fds)" |
      tee -a "$work/results"
    wait "$attacker"
    sed "s/^RESULT/ATTACK label=$t:$phase/" "$out" | tee -a "$work/results"
    stop_gateway
  done
}

capped() { # label
  local t=$1 rss0 out
  out="$work/attack-$t-capped"
  write_config "$work/capped.toml" "max_connections = $CAP"
  start_gateway "$bin/presence-gateway" "$work/capped.toml"
  rss0=$(rss_kib)
  # The webhook connections are open before the attack starts.
  "${client_cpu[@]}" "$bin/examples/loadgen" load --label "$t:capped" --addr "$ADDR" --key "$KEY" \
    --connections "$CONNECTIONS" --rate "$RATE" --duration "$DURATION" --warmup $((RAMP + 1)) \
    >"$work/capped-load" &
  local load=$!
  sleep 1
  attack slow-headers "$SLOWLORIS" "$out" --reconnect-ms 500
  local attacker=$!
  rm -f "$work/fds-stop"
  sample_fds "$work/fds-stop" "$work/fds-most" &
  local sampler=$!
  wait "$load"
  grep '^RESULT' "$work/capped-load" | tee -a "$work/results"
  echo "MEMORY label=$t:capped rss_before_kib=$rss0 rss_during_kib=$(rss_kib) rss_peak_kib=$(peak_kib) fds=$(fds)" |
    tee -a "$work/results"
  wait "$attacker"
  touch "$work/fds-stop"
  wait "$sampler"
  # Read once the attack is over: until then /metrics could be refused too.
  sleep 1
  echo "REFUSED label=$t:capped refused_total=$(metric presence_gateway_connections_refused_total)" |
    tee -a "$work/results"
  echo "FDS label=$t:capped most_fds=$(cat "$work/fds-most") max_connections=$CAP" | tee -a "$work/results"
  sed "s/^RESULT/ATTACK label=$t:capped/" "$out" | tee -a "$work/results"
  stop_gateway
}

echo "== this build"
phases new "$bin/presence-gateway"
capped new
if [ -n "$BASELINE" ]; then
  echo "== baseline: $BASELINE"
  phases base "$BASELINE"
fi

# A field of the line of a kind and label.
field() { # kind label name
  sed -n "s/^$1 label=$2 \(.* \)\?$3=\([0-9.]*\).*/\2/p" "$work/results" | head -n 1
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
success() { # label
  awk -v r="$(field RESULT "$1" requests)" -v e="$(field RESULT "$1" errors)" \
    'BEGIN { if (r + e > 0) printf "%.1f%%", 100 * r / (r + e); else print "n/a" }'
}

echo
echo "== summary: signed webhooks at $RATE/s over $CONNECTIONS connections, ${DURATION}s per phase;"
echo "   resident memory in KiB: before the attack, at the end of the measurement, peak"
echo "   (server pinned: ${server_cpu[*]:-no}; clients pinned: ${client_cpu[*]:-no})"
printf '%-18s %8s %9s %8s %9s %11s %11s %11s\n' phase success p50_us p99_us p99/idle rss_before rss_during rss_peak
targets=(new)
if [ -n "$BASELINE" ]; then targets+=(base); fi
for t in "${targets[@]}"; do
  idle_p99=$(field RESULT "$t:idle" p99_us)
  for phase in idle slow-body slowloris big-headers capped; do
    label="$t:$phase"
    [ -n "$(field RESULT "$label" rps)" ] || continue
    printf '%-18s %8s %9s %8s %9s %11s %11s %11s\n' "$label" "$(success "$label")" \
      "$(field RESULT "$label" p50_us)" "$(field RESULT "$label" p99_us)" \
      "$(ratio "$(field RESULT "$label" p99_us)" "$idle_p99")" \
      "$(field MEMORY "$label" rss_before_kib)" "$(field MEMORY "$label" rss_during_kib)" \
      "$(field MEMORY "$label" rss_peak_kib)"
  done
done
echo
echo "== what the attackers saw (answers by status; closed_unanswered: closed without an answer)"
grep '^ATTACK' "$work/results" | sed 's/^ATTACK //'
echo
echo "== the capped gateway (max_connections = $CAP, $SLOWLORIS slow-header connections)"
grep -E '^(REFUSED|FDS)' "$work/results" | sed -E 's/^(REFUSED|FDS) //'
