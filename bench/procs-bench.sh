#!/usr/bin/env bash
# CPU of the agent's process sampling (processes, procstat top N, netstat, phoenix_listen) per
# interval on a box with many processes, next to collectd's `processes` plugin, which reads
# the same /proc/PID/stat files, in the same run.
#
#   bench/procs-bench.sh                   # 5,000 sleeping processes, 60 s at a 2 s interval
#   PROCS=1000 DURATION=120 INTERVAL=5 bench/procs-bench.sh
#
# Prints, for each program, CPU seconds per minute and CPU milliseconds per interval, first
# with the extra processes absent (the box as it is), then with them. Needs python3 and
# collectd-core. Builds the release binaries (NO_BUILD=1: use those in target/release). Run
# as a user allowed PROCS more processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS=${PROCS:-5000}
DURATION=${DURATION:-60}
INTERVAL=${INTERVAL:-2}
TOP=${TOP:-10}
command -v collectd >/dev/null || { echo "collectd not found: apt-get install -y collectd-core" >&2; exit 1; }
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p phoenix-agent -p phoenix-collector
W=$(mktemp -d /tmp/phoenix-procs.XXXXXX)
SLEEPERS=()
cleanup() {
  kill "${AGENT:-}" "${COLLECTOR:-}" "${COLLECTD:-}" 2>/dev/null || true
  if [ "${#SLEEPERS[@]}" -gt 0 ]; then kill "${SLEEPERS[@]}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/phoenix-collector --listen "127.0.0.1:$PORT" --data-dir "$W/collector" --agent-token bench >"$W/collector.log" 2>&1 &
COLLECTOR=$!
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

# Only the process sampling differs between the agent's runs; everything else is the same.
./target/release/phoenix-agent run --collector "http://127.0.0.1:$PORT" --token bench --interval "${INTERVAL}s" \
  --state-dir "$W/agent" --instance-id i-bench --image-id img-bench --top-processes "$TOP" --kmsg off \
  >"$W/agent.log" 2>&1 &
AGENT=$!
UDP=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$W/collectd.conf" <<CONF
Interval $INTERVAL
BaseDir "$W/collectd"
PIDFile "$W/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin processes
LoadPlugin network
<Plugin processes>
  ProcessMatch "all" ".*"
</Plugin>
<Plugin network>
  Server "127.0.0.1" "$UDP"
</Plugin>
CONF
mkdir -p "$W/collectd"
collectd -f -C "$W/collectd.conf" >"$W/collectd.log" 2>&1 &
COLLECTD=$!
sleep 3

report() {
  local label=$1
  echo "== $label: $(find /proc -maxdepth 1 -name '[0-9]*' | wc -l) processes on the box, ${DURATION}s at ${INTERVAL}s"
  python3 bench/footprint.py "$DURATION" "phoenix" "$AGENT" "collectd" "$COLLECTD" | tee "$W/$label.txt"
  awk -v i="$INTERVAL" 'NR>1 {printf "%-10s %.1f ms CPU per interval\n", $1, $4 / 60 * i * 1000}' "$W/$label.txt"
}

report base
echo "starting $PROCS sleeping processes"
for _ in $(seq "$PROCS"); do sleep 3600 & SLEEPERS+=($!); done
sleep "$((INTERVAL * 2))"
report "with-$PROCS"
