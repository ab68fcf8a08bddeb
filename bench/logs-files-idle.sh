#!/usr/bin/env bash
# Idle CPU of the log tailer against the number of tailed files: the agent (release build,
# metrics at a 10 s interval as in production) over N log files nobody writes to, next to
# GNU `tail -F` over the same files (inotify too) in the same run. Also 1,500 files with the
# agent under `ulimit -n 1024` (its open-file budget then closes all but 256).
#
#   bench/logs-files-idle.sh                       # 100, 1,000 and 5,000 files, 60 s each
#   COUNTS="100 1000" DURATION=30 bench/logs-files-idle.sh
#
# Needs: python3, coreutils, util-linux (prlimit). Prints "% of a core" per count.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-100 1000 5000}
DURATION=${DURATION:-60}
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p phoenix-agent -p phoenix-collector
W=$(mktemp -d /tmp/phoenix-files-idle.XXXXXX)
cleanup() { kill "${AGENT:-}" "${TAIL:-}" "${COLLECTOR:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/phoenix-collector --listen "127.0.0.1:$PORT" --data-dir "$W/collector" --agent-token bench >"$W/collector.log" 2>&1 &
COLLECTOR=$!
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.2; done

# run N NOFILE: one measurement; NOFILE empty for the shell's limit.
run() {
  local n=$1 nofile=$2 d="$W/logs-$1" wrap=()
  mkdir -p "$d"
  python3 - "$d" "$n" <<'PY'
import sys
for i in range(int(sys.argv[2])):
    with open(f"{sys.argv[1]}/app-{i:05}.log", "w") as f:
        f.write(f"history {i}\n")
PY
  [ -n "$nofile" ] && wrap=(prlimit "--nofile=$nofile:$nofile" --)
  "${wrap[@]}" ./target/release/phoenix-agent run --collector "http://127.0.0.1:$PORT" --token bench --interval 10s \
    --state-dir "$W/agent-$n" --instance-id "i-idle-$n" --image-id img-bench --log "$d/*.log" >"$W/agent-$n.log" 2>&1 &
  AGENT=$!
  tail -q -F -n 0 "$d"/*.log >/dev/null 2>&1 &
  TAIL=$!
  for _ in $(seq 300); do [ -f "$W/agent-$n/logs.acked.json" ] && break; sleep 0.1; done
  sleep 5
  local label="$n files${nofile:+ (ulimit -n $nofile)}"
  echo "== $label, ${DURATION}s idle"
  python3 bench/footprint.py "$DURATION" "phoenix" "$AGENT" "tail-F" "$TAIL" | tee "$W/result-$n.txt"
  if grep -qi "too many open files\|source failed" "$W/agent-$n.log"; then
    echo "!! the agent ran out of descriptors or restarted a source:"; grep -i "too many open files\|source failed" "$W/agent-$n.log" | head -3
  fi
  kill "$AGENT" "$TAIL" 2>/dev/null || true
  wait "$AGENT" "$TAIL" 2>/dev/null || true
  AGENT="" TAIL=""
  rm -rf "$d"
}

for n in $COUNTS; do run "$n" ""; done
run 1500 1024
echo "target: the idle agent over 1,500 files under 3 % of a core; cost linear in the file count or better"
