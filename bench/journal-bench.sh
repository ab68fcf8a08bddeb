#!/usr/bin/env bash
# Journal shipping throughput: N entries in real journal files (written by
# systemd-journal-remote from export format) read by phoenix-agent through journalctl, shipped
# through phoenix-collector into InfluxDB. Reported: entries/s from the agent's start until its
# acked checkpoint holds the journal's last cursor, the CPU per entry of the agent and of its
# journalctl child (both count: the child does the journal reading), the collector's CPU per
# entry, and the count that arrived in InfluxDB (must equal N: none lost, none twice).
#
# Not a test: figures depend on the machine. Needs the release binaries
# (cargo build --release -p phoenix-agent -p phoenix-collector), influxd (Debian's influxdb
# package), systemd-journal-remote, journalctl, python3, curl and bc.
#
#   N=200000 bench/journal-bench.sh            # results on stdout; work files in $DIR
set -euo pipefail

N=${N:-200000}
DIR=${DIR:-/tmp/journal-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${AGENT:-$ROOT/target/release/phoenix-agent}
COLLECTOR=${COLLECTOR:-$ROOT/target/release/phoenix-collector}
REMOTE=${REMOTE:-$(ls /lib/systemd/systemd-journal-remote /usr/lib/systemd/systemd-journal-remote 2>/dev/null | head -1)}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
INFLUX_PORT=$(free_port)
INFLUX_RPC_PORT=$(free_port)
COLLECTOR_PORT=$(free_port)
TIMEOUT=${TIMEOUT:-600}
TOKEN=bench-agent-token-0123456789

for bin in "$AGENT" "$COLLECTOR"; do
    [ -x "$bin" ] || { echo "missing $bin: run cargo build --release -p phoenix-agent -p phoenix-collector" >&2; exit 2; }
done
[ -x "$REMOTE" ] || { echo "systemd-journal-remote not found: apt-get install -y systemd-journal-remote" >&2; exit 2; }
command -v influxd >/dev/null || { echo "influxd not found: apt-get install -y influxdb" >&2; exit 2; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
now() { date +%s.%N; }
wait_for() { # wait_for SECONDS CMD...
    local end=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timed out waiting for: $*" >&2; return 1; }
        sleep 0.1
    done
}
# CPU seconds of a process: its own (all threads, also those that ended) and that of its
# children it has reaped (the agent's short journalctl probes).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13 + $14 + $15) / hz }' "/proc/$1/stat"; }

rm -rf "$DIR"
mkdir -p "$DIR/journal"
echo "generating $N journal entries..." >&2
python3 - "$N" <<'PY' | "$REMOTE" --output="$DIR/journal/system.journal" - 2>/dev/null
import sys, time
n = int(sys.argv[1])
t0 = int(time.time() * 1e6) - n * 10
out = sys.stdout.buffer
units = [b"nginx.service", b"app.service", b"sshd.service", b"cron.service", b"kernel"]
for i in range(n):
    msg = b"request id=%d method=GET path=/api/v1/items/%d status=200 duration_ms=%d user_agent=\"curl/8.0\"" % (i, i % 977, i % 300)
    if i % 50 == 0:
        msg = b"multi-line\n  at frame %d\n  at frame %d" % (i, i + 1)
    out.write(b"__REALTIME_TIMESTAMP=%d\n__MONOTONIC_TIMESTAMP=%d\n_BOOT_ID=0123456789abcdef0123456789abcdef\n"
              b"_SYSTEMD_UNIT=%s\nPRIORITY=%d\n_PID=%d\n_COMM=app\nSYSLOG_IDENTIFIER=app\n_HOSTNAME=bench\n_TRANSPORT=stdout\n"
              % (t0 + i * 10, 1000000 + i * 10, units[i % 5], 3 + i % 5, 1000 + i % 50))
    if b"\n" in msg:
        out.write(b"MESSAGE\n" + len(msg).to_bytes(8, "little") + msg + b"\n\n")
    else:
        out.write(b"MESSAGE=" + msg + b"\n\n")
PY
LAST=$(journalctl --directory="$DIR/journal" -n 1 -o export --output-fields=_BOOT_ID --no-pager | sed -n 's/^__CURSOR=//p')
echo "journal: $N entries, $(du -sh "$DIR/journal" | cut -f1) in $(ls "$DIR/journal" | wc -l) file(s)"
echo "machine: $(nproc) cores, $(awk '/model name/ { $1=$2=$3=""; print; exit }' /proc/cpuinfo)"

mkdir -p "$DIR/influx"
. "$ROOT/bench/influx-conf.sh"
influx_conf "$DIR/influx" "$INFLUX_PORT" "$INFLUX_RPC_PORT"
influxd run -config "$DIR/influx/influxdb.conf" > "$DIR/influx/influxd.log" 2>&1 &
PIDS+=("$!")
wait_for 30 curl -sf -o /dev/null "http://127.0.0.1:$INFLUX_PORT/ping"
"$COLLECTOR" --listen "127.0.0.1:$COLLECTOR_PORT" --data-dir "$DIR/collector" --agent-token "$TOKEN" \
    --influx-url "http://127.0.0.1:$INFLUX_PORT" --influx-db bench > "$DIR/collector.log" 2>&1 &
CPID=$!
PIDS+=("$CPID")
wait_for 30 curl -sf -o /dev/null "http://127.0.0.1:$COLLECTOR_PORT/healthz"

# --journal-initial boot: every entry is in the journal's latest boot, so all N are read.
t0=$(now)
"$AGENT" run --collector "http://127.0.0.1:$COLLECTOR_PORT" --token "$TOKEN" --state-dir "$DIR/agent" \
    --journal-dir "$DIR/journal" --journal-initial boot --instance-id i-bench --image-id img-bench > "$DIR/agent.log" 2>&1 &
APID=$!
PIDS+=("$APID")
done_acked() { grep -qF "\"after\":\"$LAST\"" "$DIR/agent/journal.acked.json" 2>/dev/null; }
JPID=""
jcpu=0
until done_acked; do
    kill -0 "$APID" 2>/dev/null || { echo "agent exited:" >&2; cat "$DIR/agent.log" >&2; exit 1; }
    # The following journalctl child: sample its CPU while it lives (it is killed at the end).
    c=$(pgrep -P "$APID" -f -- '--follow' | head -1 || true)
    if [ -n "$c" ]; then JPID=$c; jcpu=$(cpu_s "$c" 2>/dev/null || echo "$jcpu"); fi
    [ "$(echo "$(now) - $t0 < $TIMEOUT" | bc)" = 1 ] || { echo "timed out; agent log:" >&2; tail "$DIR/agent.log" >&2; exit 1; }
    sleep 0.1
done
t1=$(now)
[ -n "$JPID" ] && jcpu=$(cpu_s "$JPID" 2>/dev/null || echo "$jcpu")
acpu=$(cpu_s "$APID")
ccpu=$(cpu_s "$CPID")
hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$APID/status")
kill "$APID"
secs=$(echo "$t1 - $t0" | bc -l)
count=$(curl -sf -G "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode db=bench --data-urlencode "q=SELECT count(message) FROM log" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(r["series"][0]["values"][0][1] if "series" in r else 0)')
printf 'journal -> agent -> collector -> InfluxDB: %.0f entries/s (%d entries in %.2f s)\n' "$(echo "$N / $secs" | bc -l)" "$N" "$secs"
printf 'CPU per entry: agent %.2f µs + journalctl %.2f µs = %.2f µs; collector %.2f µs; agent VmHWM %d MB\n' \
    "$(echo "$acpu * 1000000 / $N" | bc -l)" "$(echo "$jcpu * 1000000 / $N" | bc -l)" "$(echo "($acpu + $jcpu) * 1000000 / $N" | bc -l)" \
    "$(echo "$ccpu * 1000000 / $N" | bc -l)" $(( hwm / 1024 ))
echo "entries in InfluxDB: $count of $N"
