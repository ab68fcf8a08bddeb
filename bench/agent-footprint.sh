#!/usr/bin/env bash
# The agent's footprint next to collectd's, in the same run on the same box:
# peak RSS (VmHWM), CPU seconds per minute (schedstat), and the agent's stripped binary size.
#
#   bench/agent-footprint.sh             # 180 s at a 10 s interval
#   DURATION=300 bench/agent-footprint.sh
#   AGENT_ARGS="--top-processes 0" bench/agent-footprint.sh   # extra flags for both agents [default: --top-processes 10]
#   AGENT_B=/tmp/old/phoenix-agent bench/agent-footprint.sh    # also that binary with logs+drift, side by side
# The box's process count is printed: the top-processes scan reads /proc/<pid> of every one.
#
# Needs: collectd-core (apt-get install -y collectd-core), python3. Builds the release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-180}
INTERVAL=${INTERVAL:-10}
AGENT_ARGS=${AGENT_ARGS:---top-processes 10}
command -v collectd >/dev/null || { echo "collectd not found: apt-get install -y collectd-core" >&2; exit 1; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p phoenix-agent -p phoenix-collector
W=$(mktemp -d /tmp/phoenix-footprint.XXXXXX)
cleanup() { kill "${AGENT:-}" "${AGENT_LOGS:-}" "${AGENT_B_PID:-}" "${COLLECTOR:-}" "${COLLECTD:-}" "${COLLECTD_TCP:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/phoenix-collector --listen "127.0.0.1:$PORT" --data-dir "$W/collector" --agent-token bench >"$W/collector.log" 2>&1 &
COLLECTOR=$!
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

# shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
./target/release/phoenix-agent run --collector "http://127.0.0.1:$PORT" --token bench --interval "${INTERVAL}s" \
  --state-dir "$W/agent" --instance-id i-bench --image-id img-bench $AGENT_ARGS >"$W/agent.log" 2>&1 &
AGENT=$!
# The same agent with one log file and drift over /etc (the idle footprint issue 16 targets).
mkdir -p "$W/logs"
: >"$W/logs/app.log"
# shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
./target/release/phoenix-agent run --collector "http://127.0.0.1:$PORT" --token bench --interval "${INTERVAL}s" \
  --state-dir "$W/agent-logs" --instance-id i-bench-logs --image-id img-bench \
  --log "$W/logs/app.log" --drift-path /etc $AGENT_ARGS >"$W/agent-logs.log" 2>&1 &
AGENT_LOGS=$!
# An A/B of two builds in one run: runs differ by more than a change is worth (page cache,
# timer slack), agents side by side do not.
B=()
if [ -n "${AGENT_B:-}" ]; then
  mkdir -p "$W/logs-b"
  : >"$W/logs-b/app.log"
  # shellcheck disable=SC2086 # AGENT_ARGS is a list of flags
  "$AGENT_B" run --collector "http://127.0.0.1:$PORT" --token bench --interval "${INTERVAL}s" \
    --state-dir "$W/agent-b" --instance-id i-bench-b --image-id img-bench \
    --log "$W/logs-b/app.log" --drift-path /etc $AGENT_ARGS >"$W/agent-b.log" 2>&1 &
  AGENT_B_PID=$!
  B=("logs+drift-B" "$AGENT_B_PID")
fi

# collectd with the plugins that match the agent's metrics, same interval, sending over UDP
# (its network plugin) as it would to a central server.
UDP=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$W/collectd.conf" <<CONF
Interval $INTERVAL
BaseDir "$W/collectd"
PIDFile "$W/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin interface
LoadPlugin df
LoadPlugin load
LoadPlugin disk
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "$UDP"
</Plugin>
CONF
mkdir -p "$W/collectd"
collectd -f -C "$W/collectd.conf" >"$W/collectd.log" 2>&1 &
COLLECTD=$!
# The same collectd plus tcpconns counting every TCP state (what the agent's netstat
# measurement does, through the same kernel inet_diag walk): the peer doing the agent's work.
sed -e "s|$W/collectd\([\"/.]\)|$W/collectd-tcp\1|g" "$W/collectd.conf" >"$W/collectd-tcp.conf"
cat >>"$W/collectd-tcp.conf" <<CONF
LoadPlugin tcpconns
<Plugin tcpconns>
  ListeningPorts false
  AllPortsSummary true
</Plugin>
CONF
mkdir -p "$W/collectd-tcp"
collectd -f -C "$W/collectd-tcp.conf" >"$W/collectd-tcp.log" 2>&1 &
COLLECTD_TCP=$!
# Past the start: the first drift scan of /etc is a one-off, not the idle cost.
sleep "${SETTLE:-5}"
echo "processes on the box: $(find /proc -maxdepth 1 -name '[0-9]*' | wc -l); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "measuring for ${DURATION}s at a ${INTERVAL}s interval (agent pid $AGENT, agent with logs+drift pid $AGENT_LOGS, collectd pid $COLLECTD)"
python3 bench/footprint.py "$DURATION" "phoenix" "$AGENT" "logs+drift" "$AGENT_LOGS" "collectd" "$COLLECTD" "collectd+tcp" "$COLLECTD_TCP" "${B[@]}" | tee "$W/result.txt"
# shellcheck disable=SC2046
set -- $(awk '$1=="phoenix"{a=$2" "$4} $1=="logs+drift"{l=$2" "$4} $1=="collectd"{c=$2" "$4} END{print a, l, c}' "$W/result.txt")
python3 - "$@" <<'PY'
import sys
a_rss, a_cpu, l_rss, l_cpu, c_rss, c_cpu = map(float, sys.argv[1:7])
for name, rss, cpu in (("metrics only", a_rss, a_cpu), ("logs+drift", l_rss, l_cpu)):
    print(f"ratio agent ({name})/collectd: peak RSS {rss / c_rss:.2f}x ({rss / 1024:.2f} MiB), CPU {cpu / max(c_cpu, 1e-9):.2f}x")
PY
awk '$1=="collectd+tcp"{c=$4; cr=$2} $1=="logs+drift"{l=$4; lr=$2} END{printf "ratio agent (logs+drift)/collectd+tcp: peak RSS %.2fx, CPU %.2fx\n", lr/cr, l/c}' "$W/result.txt"
[ -z "${AGENT_B:-}" ] || awk '$1=="collectd"{c=$4; cr=$2} $1=="logs+drift-B"{b=$4; br=$2} END{printf "ratio %s (logs+drift)/collectd: peak RSS %.2fx (%.2f MiB), CPU %.2fx\n", "'"$AGENT_B"'", br/cr, br/1024, b/c}' "$W/result.txt"
SIZE=$(stat -c %s target/release/phoenix-agent)
echo "phoenix-agent stripped release binary: $SIZE bytes ($(python3 -c "print(round($SIZE/1048576, 2))") MiB)"
echo "targets: peak RSS <= 8 MiB (8192 kB), <= 0.03 CPU-s/min, binary <= 5 MiB; with logs+drift <= 3x collectd's CPU-s/min and <= 6 MiB peak RSS"
grep -c '"accepted"' "$W/collector.log" >/dev/null 2>&1 || true
