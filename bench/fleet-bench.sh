#!/usr/bin/env bash
# One collector under a simulated fleet, end to end into a real InfluxDB:
#   - reports/s the collector sustains (each acked only after InfluxDB took its points),
#     checked against the points that InfluxDB holds afterwards;
#   - the collector's CPU (cores used: utime+stime / wall time) and memory (VmRSS at the end,
#     VmHWM peak) at that load, and influxd's CPU next to it;
#   - the time from an instance's last report to its mark in GET /v1/phoenix (instance 0 of
#     the fleet stops reporting at SILENCE_AT seconds; expected about --silent-after plus two
#     intervals of settling plus up to one queue tick).
#   - the collector's memory per instance: VmHWM at the end minus the VmHWM of the same
#     collector empty (before the first report), divided by INSTANCES;
#   - the issue-12 criterion: no live instance marked or held, instance 0 marked within
#     --silent-after + 2 intervals + 5 s of its last report.
# fleetsim (tests/src/bin/fleetsim.rs) speaks the real wire format: gzip JSON reports with
# per-boot seq numbers, ~40 Telegraf-shaped points each, each instance with its own
# credential (--identity tofu), the fleet spread over the interval. It paces every instance
# at its interval in CONNECTIONS lanes of up to PER_LANE keep-alive connections each (one
# report in flight per connection; 3,000 by default, under the collector's 4,096 cap), from
# 127.0.0.2..254, on one async runtime (THREADS threads), and prints the rate it sent next
# to the rate acked and how many reports went out late: when none is late, the collector
# and its store are what is measured, not the simulator.
#
# Not a test: figures depend on the machine, and fleetsim and influxd share it with the
# collector. Needs release binaries and influxd (Debian's influxdb package):
#   cargo build --release -p phoenix-collector -p phoenix-e2e --bin phoenix-collector --bin fleetsim
#   INSTANCES=10000 INTERVAL=10 DURATION=120 bench/fleet-bench.sh
#   INSTANCES=10000 SILENCE_AT=20 SILENT_AFTER=15s DURATION=80 bench/fleet-bench.sh  # issue 12
set -euo pipefail

INSTANCES=${INSTANCES:-10000}
INTERVAL=${INTERVAL:-10}
POINTS=${POINTS:-40}
DURATION=${DURATION:-120}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-1000}
PER_LANE=${PER_LANE:-3}
SILENCE_AT=${SILENCE_AT:-30}
SILENT_AFTER=${SILENT_AFTER:-30s}
DIR=${DIR:-/tmp/fleet-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COLLECTOR=${COLLECTOR:-$ROOT/target/release/phoenix-collector}
FLEETSIM=${FLEETSIM:-$ROOT/target/release/fleetsim}
TOKEN=bench-agent-token-0123456789
RTOKEN=bench-recycler-token-0123456789

for bin in "$COLLECTOR" "$FLEETSIM"; do
    [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p phoenix-collector -p phoenix-e2e --bin phoenix-collector --bin fleetsim" >&2; exit 2; }
done
command -v influxd >/dev/null || { echo "influxd not found: apt-get install -y influxdb" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl not found" >&2; exit 2; }
command -v jq >/dev/null || { echo "jq not found" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
INFLUX_PORT=$(free_port)
RPC_PORT=$(free_port)
COLLECTOR_PORT=$(free_port)

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
# CPU seconds of the threads of $1 whose name starts with $2 (threads that ended are not counted:
# use it for the long-lived ones, the queue driver and the InfluxDB writers).
thread_cpu_s() {
    local hz sum=0 t
    hz=$(getconf CLK_TCK)
    for t in /proc/"$1"/task/*; do
        case "$(cat "$t/comm" 2>/dev/null)" in "$2"*) sum=$(awk -v s="$sum" -v hz="$hz" '{ sub(/.*\) /, ""); print s + ($12 + $13) / hz }' "$t/stat") ;; esac
    done
    echo "$sum"
}
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

rm -rf "$DIR"
mkdir -p "$DIR/influx" "$DIR/collector"
. "$ROOT/bench/influx-conf.sh"
influx_conf "$DIR/influx" "$INFLUX_PORT" "$RPC_PORT"
influxd -config "$DIR/influx/influxdb.conf" > "$DIR/influxd.log" 2>&1 &
INFLUX_PID=$!
PIDS+=("$INFLUX_PID")
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$INFLUX_PORT/ping" >/dev/null && break; sleep 0.2; done
curl -fsS -XPOST "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode 'q=CREATE DATABASE fleet' >/dev/null

start_collector() { # start_collector DATA_DIR LOG
    PHOENIX_LOG_LEVEL=${PHOENIX_LOG_LEVEL:-warn} "$COLLECTOR" --listen "127.0.0.1:$COLLECTOR_PORT" --data-dir "$1" \
        --influx-url "http://127.0.0.1:$INFLUX_PORT" --influx-db fleet \
        --agent-token "$TOKEN" --recycler-token "$RTOKEN" \
        --grace 5s --silent-after "$SILENT_AFTER" > "$2" 2>&1 &
    COLLECTOR_PID=$!
    PIDS+=("$COLLECTOR_PID")
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$COLLECTOR_PORT/healthz" >/dev/null && break; sleep 0.2; done
    kill -0 "$COLLECTOR_PID" || { cat "$2"; exit 1; }
}

# Warm-up: InfluxDB 1.x creates new series slowly (the fleet has INSTANCES x ~40 of them), so
# every instance reports once through a throw-away collector first; the measured run then
# starts with a fresh collector (empty fleet state) on a database whose series exist, as in
# production after the first minutes.
if [ "${WARMUP:-1}" = 1 ]; then
    start_collector "$DIR/warmup" "$DIR/collector-warmup.log"
    w0=$(date +%s.%N)
    "$FLEETSIM" --url "http://127.0.0.1:$COLLECTOR_PORT" --token "$TOKEN" --instances "$INSTANCES" \
        --points "$POINTS" --threads "$THREADS" --connections "$CONNECTIONS" --per-lane "$PER_LANE" --rounds 1 --duration 3600 > "$DIR/warmup.json" 2> "$DIR/warmup.log"
    echo "warm-up: $(jq .reports_ok "$DIR/warmup.json") reports creating the series took $(awk -v a="$w0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s"
    kill "$COLLECTOR_PID"; wait "$COLLECTOR_PID" 2>/dev/null || true
fi
# The instances enrolled (trust on first use) in the warm-up stay enrolled, as after a
# collector restart: a first report's enrolment is an fsync, once in an instance's life, and
# in a 60 s run it would be charged to a sixth of the reports. ENROLLED=0 measures a fleet's
# very first minute instead (every instance enrols during the run). The empty figure then
# holds the gate's table of known ids (about 1 MB at 10,000).
if [ "${WARMUP:-1}" = 1 ] && [ "${ENROLLED:-1}" = 1 ] && [ -f "$DIR/warmup/enrolments.log" ]; then
    cp "$DIR/warmup/enrolments.log" "$DIR/collector/"
fi
start_collector "$DIR/collector" "$DIR/collector.log"
empty_hwm=$(status_kb "$COLLECTOR_PID" VmHWM)

echo "fleet: $INSTANCES instances every ${INTERVAL}s, $POINTS points per report, ${DURATION}s; $(nproc) cores"
c0=$(cpu_s "$COLLECTOR_PID"); i0=$(cpu_s "$INFLUX_PID"); t0=$(date +%s.%N)
d0=$(thread_cpu_s "$COLLECTOR_PID" phoenix-decider); w0=$(thread_cpu_s "$COLLECTOR_PID" influx-writer)
"$FLEETSIM" --url "http://127.0.0.1:$COLLECTOR_PORT" --token "$TOKEN" --recycler-token "$RTOKEN" \
    --instances "$INSTANCES" --interval "$INTERVAL" --points "$POINTS" --duration "$DURATION" \
    --threads "$THREADS" --connections "$CONNECTIONS" --per-lane "$PER_LANE" --silence-at "$SILENCE_AT" > "$DIR/fleetsim.json" 2> >(tee "$DIR/fleetsim.log" >&2) &
SIM_PID=$!
# The queue as the recycler sees it while the fleet still reports (once it stops, the whole
# fleet turns silent: a mass event, held, which is right but not what is measured here).
sleep $((DURATION - 3))
phx=$(curl -fsS -H "Authorization: Bearer $RTOKEN" "http://127.0.0.1:$COLLECTOR_PORT/v1/phoenix")
wait "$SIM_PID"
c1=$(cpu_s "$COLLECTOR_PID"); i1=$(cpu_s "$INFLUX_PID"); t1=$(date +%s.%N)
d1=$(thread_cpu_s "$COLLECTOR_PID" phoenix-decider); w1=$(thread_cpu_s "$COLLECTOR_PID" influx-writer)
rss=$(status_kb "$COLLECTOR_PID" VmRSS); hwm=$(status_kb "$COLLECTOR_PID" VmHWM)
sleep 2
stored=$(curl -fsS "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode db=fleet \
    --data-urlencode "q=SELECT count(usage_idle) FROM cpu WHERE cpu = 'cpu-total'" | jq '.results[0].series[0].values[0][1] // 0')
sim=$(cat "$DIR/fleetsim.json")

awk -v d0="$d0" -v d1="$d1" -v w0="$w0" -v w1="$w1" -v c0="$c0" -v c1="$c1" -v i0="$i0" -v i1="$i1" -v t0="$t0" -v t1="$t1" -v rss="$rss" -v hwm="$hwm" \
    -v ok="$(jq .reports_ok <<<"$sim")" -v sent="$(jq .sent_per_s <<<"$sim")" -v late="$(jq .late <<<"$sim")" \
    -v empty="$empty_hwm" -v n="$INSTANCES" -v rps="$(jq .reports_per_s <<<"$sim")" -v want="$(jq .wanted_reports_per_s <<<"$sim")" \
    -v pps="$(jq .points_per_s <<<"$sim")" -v lat="$(jq .mean_latency_ms <<<"$sim")" -v u="$(jq .unavailable <<<"$sim")" \
    -v e="$(jq .errors <<<"$sim")" -v stored="$stored" -v mark="$(jq .silent_to_mark_s <<<"$sim")" \
    -v marked="$(jq '.marked | length' <<<"$phx")" -v held="$(jq '.held | length' <<<"$phx")" 'BEGIN {
    w = t1 - t0
    printf "reports/s acked:        %.0f (wanted %.0f, fleetsim sent %.0f, %d late); points/s %.0f; mean report latency %.1f ms\n", rps, want, sent, late, pps, lat
    printf "503/429 answers:        %d; other errors: %d\n", u, e
    printf "reports acked / stored: %d / %d cpu-total points in InfluxDB\n", ok, stored
    printf "collector CPU:          %.2f cores (%.0f us per report acked)\n", (c1 - c0) / w, (ok > 0 ? (c1 - c0) / ok * 1e6 : 0)
    # Reports answered 503/429 were still read, gunzipped, decoded and admitted (proof of
    # life), so under a saturated InfluxDB the per-acked figure charges their CPU to the few
    # acked ones; this one divides by every report answered.
    printf "                        %.0f us per report answered (acked + 503/429)\n", ((ok + u) > 0 ? (c1 - c0) / (ok + u) * 1e6 : 0)
    # Where it went: the passes of the queue driver over the whole fleet (a cost per pass, not
    # per report), the InfluxDB writers, and the rest (HTTP, decode, admission, line protocol).
    printf "                        queue driver %.2f cores, InfluxDB writers %.2f, the rest %.2f\n", (d1 - d0) / w, (w1 - w0) / w, (c1 - c0 - (d1 - d0) - (w1 - w0)) / w
    printf "collector memory:       VmRSS %.0f MiB, VmHWM %.0f MiB; empty %.1f MiB: %.2f KB an instance\n", rss / 1024, hwm / 1024, empty / 1024, (hwm - empty) / n
    printf "influxd CPU:            %.2f cores\n", (i1 - i0) / w
    printf "silent to marked:       %s s (instance 0 stopped at %s s)\n", mark, '"$SILENCE_AT"'
    printf "queue near the end:     %d marked, %d held\n", marked, held
}'
echo "load:                  $(uptime | sed 's/.*load average/load average/') (the machine is shared)"
echo "marked near the end:    $(jq -r '[.marked[].instance_id] | .[:10] | join(" ")' <<<"$phx") (instance 0: ${PREFIX:-i-f}-000000)"
if [ "$(jq '.held | length' <<<"$phx")" != 0 ]; then
    echo "held, by reason (first 5):"
    jq -r '[.held[] | "\(.reason): \(.hold)"] | group_by(.) | map("  \(length) x \(.[0])") | .[:5][]' <<<"$phx"
fi
