#!/usr/bin/env bash
# Log shipping throughput, in one run on this box:
#   1. InfluxDB alone: the same lines written directly as `log` points, BATCH per request.
#   2. rsyslog imfile -> omfwd TCP -> a Python sink (the peer to beat).
#   3. phoenix-agent -> a counting HTTP sink: the agent's own rate, as rsyslog's is measured.
#   4. phoenix-agent -> phoenix-collector (file sink, no database).
#   5. phoenix-agent -> phoenix-collector -> InfluxDB: end to end, against step 1.
# Each shipper drains the same backlog file of N lines from its start. Reported: lines/s, CPU
# µs per line (utime+stime of the shipper's process / N) and peak RSS (VmHWM), and for the
# phoenix runs a count of the lines that arrived (must equal N: no loss, no duplicates).
#
# Not a test: figures depend on the machine. Needs the release binaries
# (cargo build --release -p phoenix-agent -p phoenix-collector), influxd (Debian's influxdb
# package), rsyslogd (rsyslog) and python3.
#
#   N=1000000 bench/logs-bench.sh            # results on stdout; work files in $DIR
#   PHOENIX_MAX_IN_FLIGHT=1 N=300000 bench/logs-bench.sh      # the agent's window (default 4)
#   COLLECTOR_ARGS="--influx-gzip false" N=300000 bench/logs-bench.sh   # extra flags for step 5
set -euo pipefail

N=${N:-1000000}
BATCH=${BATCH:-5000}
DIR=${DIR:-/tmp/logs-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${AGENT:-$ROOT/target/release/phoenix-agent}
COLLECTOR=${COLLECTOR:-$ROOT/target/release/phoenix-collector}
# Free loopback ports, so another influxd or collector already running here is never used.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
INFLUX_PORT=${INFLUX_PORT:-$(free_port)}
INFLUX_RPC_PORT=${INFLUX_RPC_PORT:-$(free_port)}
COLLECTOR_PORT=${COLLECTOR_PORT:-$(free_port)}
SINK_PORT=${SINK_PORT:-$(free_port)}
TIMEOUT=${TIMEOUT:-300}
TOKEN=bench-agent-token-0123456789

for bin in "$AGENT" "$COLLECTOR"; do
    [ -x "$bin" ] || { echo "missing $bin: run cargo build --release -p phoenix-agent -p phoenix-collector" >&2; exit 2; }
done
command -v influxd >/dev/null || { echo "influxd not found: apt-get install -y influxdb" >&2; exit 2; }
command -v rsyslogd >/dev/null || { echo "rsyslogd not found: apt-get install -y rsyslog" >&2; exit 2; }

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

stop() { # stop PID: SIGTERM, wait up to 10 s
    local p=$1
    kill "$p" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
}

alive() { # alive PID NAME LOG: the answer came from our process, not another on that port
    kill -0 "$1" 2>/dev/null || { echo "$2 exited; its log:" >&2; cat "$3" >&2; exit 1; }
}
now() { date +%s.%N; }
cpu_s() { # utime+stime of PID in seconds
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }
wait_for() { # wait_for SECONDS CMD...: poll until CMD succeeds
    local limit=$1; shift
    local end=$(( $(date +%s) + limit ))
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timed out waiting for: $*" >&2; return 1; }
        sleep 0.05
    done
}
influx_query() {
    curl -sf -G "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode "db=$1" --data-urlencode "q=$2"
}

rm -rf "$DIR"
mkdir -p "$DIR"
LOG=$DIR/app.log
echo "generating $N lines..." >&2
python3 "$ROOT/bench/logs-gen.py" "$N" "$LOG"
SIZE=$(stat -c %s "$LOG")
echo "file: $N lines, $SIZE bytes ($(( SIZE / N )) bytes/line avg)"
echo "machine: $(nproc) cores, $(awk '/model name/ { $1=$2=$3=""; print; exit }' /proc/cpuinfo)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); agent window: ${PHOENIX_MAX_IN_FLIGHT:-4} batches in flight"
echo

# --- InfluxDB -------------------------------------------------------------------------------
mkdir -p "$DIR/influx"
. "$ROOT/bench/influx-conf.sh"
influx_conf "$DIR/influx" "$INFLUX_PORT" "$INFLUX_RPC_PORT"
influxd run -config "$DIR/influx/influxdb.conf" > "$DIR/influx/influxd.log" 2>&1 &
INFLUX_PID=$!
PIDS+=("$INFLUX_PID")
wait_for 30 curl -sf -o /dev/null "http://127.0.0.1:$INFLUX_PORT/ping"
alive "$INFLUX_PID" influxd "$DIR/influx/influxd.log"

read -r dn dsecs drate < <(python3 "$ROOT/bench/logs-influx-direct.py" "$LOG" "http://127.0.0.1:$INFLUX_PORT" direct "$BATCH")
printf '%-44s %9s lines/s  (%s lines in %s s, %s per request)\n' "1. InfluxDB direct write" "$drate" "$dn" "$dsecs" "$BATCH"

# --- rsyslog --------------------------------------------------------------------------------
mkdir -p "$DIR/rsyslog"
cat > "$DIR/rsyslog/rsyslog.conf" <<EOF
global(workDirectory="$DIR/rsyslog" maxMessageSize="64k")
module(load="imfile" mode="inotify")
template(name="fwd" type="string" string="<%PRI%>%TIMESTAMP:::date-rfc3339% %HOSTNAME% %syslogtag%%msg%\n")
ruleset(name="fwd") {
  action(type="omfwd" target="127.0.0.1" port="$SINK_PORT" protocol="tcp" template="fwd")
}
input(type="imfile" file="$LOG" tag="app:" ruleset="fwd" freshStartTail="off")
EOF
python3 "$ROOT/bench/logs-tcp-sink.py" "$SINK_PORT" "$N" "$DIR/rsyslog/sink.done" &
SINK_PID=$!
PIDS+=("$SINK_PID")
# Listening before rsyslog starts: a refused first connect costs rsyslog a 30 s resume wait.
port_open() { python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" 2>/dev/null; }
wait_for 10 port_open "$SINK_PORT"
alive "$SINK_PID" logs-tcp-sink.py /dev/null
t0=$(now)
rsyslogd -n -f "$DIR/rsyslog/rsyslog.conf" -i "$DIR/rsyslog/rsyslogd.pid" > "$DIR/rsyslog/rsyslogd.log" 2>&1 &
RS_PID=$!
PIDS+=("$RS_PID")
wait_for "$TIMEOUT" test -e "$DIR/rsyslog/sink.done"
t1=$(now)
rs_cpu=$(cpu_s "$RS_PID"); rs_hwm=$(hwm_kb "$RS_PID")
stop "$RS_PID"
read -r rs_lines _ < "$DIR/rsyslog/sink.done"
rs_secs=$(echo "$t1 - $t0" | bc -l)
printf '%-44s %9.0f lines/s  (%s lines in %.2f s, %.2f µs CPU/line, VmHWM %d MB)\n' "2. rsyslog imfile -> TCP sink" \
    "$(echo "$N / $rs_secs" | bc -l)" "$rs_lines" "$rs_secs" "$(echo "$rs_cpu * 1000000 / $N" | bc -l)" $(( rs_hwm / 1024 ))

# --- phoenix --------------------------------------------------------------------------------
# The agent is done when its acked checkpoint (written only after the receiver's 200) is at
# the end of the file.
acked_offset() { grep -o '"offset":[0-9]*' "$1/logs.acked.json" 2>/dev/null | head -1 | cut -d: -f2; }
all_acked() { [ "$(acked_offset "$1")" = "$SIZE" ]; }

run_agent() { # run_agent DIR LABEL URL [SERVER_PID]: drain the file, print rate, CPU and RSS
    local d=$1 label=$2 url=$3 spid=${4:-}
    local t0 t1 apid
    t0=$(now)
    "$AGENT" run --collector "$url" --token "$TOKEN" --state-dir "$d/agent" \
        --log "$LOG" --log-initial start --instance-id i-bench --image-id img-bench > "$d/agent.log" 2>&1 &
    apid=$!
    PIDS+=("$apid")
    wait_for "$TIMEOUT" all_acked "$d/agent"
    t1=$(now)
    local acpu ahwm secs extra=""
    acpu=$(cpu_s "$apid"); ahwm=$(hwm_kb "$apid")
    if [ -n "$spid" ]; then
        extra=$(printf '; collector %.2f µs CPU/line, VmHWM %d MB' "$(echo "$(cpu_s "$spid") * 1000000 / $N" | bc -l)" $(( $(hwm_kb "$spid") / 1024 )))
    fi
    stop "$apid"
    secs=$(echo "$t1 - $t0" | bc -l)
    PH_RATE=$(echo "$N / $secs" | bc -l)
    printf '%-44s %9.0f lines/s  (%.2f s; agent %.2f µs CPU/line, VmHWM %d MB%s)\n' \
        "$label" "$PH_RATE" "$secs" "$(echo "$acpu * 1000000 / $N" | bc -l)" $(( ahwm / 1024 )) "$extra"
}

start_collector() { # start_collector DIR [collector args...]: sets CPID
    local d=$1; shift
    "$COLLECTOR" --listen "127.0.0.1:$COLLECTOR_PORT" --data-dir "$d/collector" --agent-token "$TOKEN" "$@" > "$d/collector.log" 2>&1 &
    CPID=$!
    PIDS+=("$CPID")
    wait_for 30 curl -sf -o /dev/null "http://127.0.0.1:$COLLECTOR_PORT/healthz"
    alive "$CPID" phoenix-collector "$d/collector.log"
}

# 3. The agent's own rate, against a sink that only counts (as rsyslog's sink does).
d=$DIR/agent-null; mkdir -p "$d"
python3 "$ROOT/bench/logs-http-sink.py" "$COLLECTOR_PORT" "$d/count" &
SPID=$!
PIDS+=("$SPID")
wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$COLLECTOR_PORT/healthz"
alive "$SPID" logs-http-sink.py /dev/null
run_agent "$d" "3. phoenix-agent -> counting HTTP sink" "http://127.0.0.1:$COLLECTOR_PORT"
AGENT_RATE=$PH_RATE
stop "$SPID"
echo "   lines counted by the sink: $(cat "$d/count" 2>/dev/null || echo 0) of $N"

# 4. Through the collector, writing line protocol files (no database).
d=$DIR/agent-file; mkdir -p "$d"
start_collector "$d"
run_agent "$d" "4. phoenix-agent -> collector (file sink)" "http://127.0.0.1:$COLLECTOR_PORT" "$CPID"
stop "$CPID"
arrived=$(cat "$d"/collector/influx/* 2>/dev/null | grep -c '^log,' || true)
echo "   lines in the collector's line-protocol files: $arrived of $N"

# 5. End to end into InfluxDB.
d=$DIR/agent-influx; mkdir -p "$d"
# shellcheck disable=SC2086 # COLLECTOR_ARGS is a list of flags
start_collector "$d" --influx-url "http://127.0.0.1:$INFLUX_PORT" --influx-db phoenix ${COLLECTOR_ARGS:-}
run_agent "$d" "5. phoenix-agent -> collector -> InfluxDB" "http://127.0.0.1:$COLLECTOR_PORT" "$CPID"
stop "$CPID"
E2E_RATE=$PH_RATE
count=$(influx_query phoenix "SELECT count(message) FROM log" | grep -o '"values":\[\[[^]]*\]' | grep -o '[0-9]*\]$' | tr -d ']')
echo "   lines in InfluxDB (count of message): ${count:-0} of $N$([ "${count:-0}" = "$N" ] && echo ' (all, once each)' || echo ' (LOST OR EXTRA LINES)')"
echo
printf 'agent vs rsyslog: %.2fx   end-to-end vs InfluxDB direct: %.0f %%\n' \
    "$(echo "$AGENT_RATE * $rs_secs / $N" | bc -l)" "$(echo "$E2E_RATE * 100 / $drate" | bc -l)"
