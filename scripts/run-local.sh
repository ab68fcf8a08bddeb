#!/usr/bin/env bash
# The main job on one machine: a collector plus a local agent shipping this host's metrics
# (and, if given, log files) to it. Without PHOENIX_INFLUX_URL the collector writes line
# protocol under ./phoenix-data/influx (import with `influx -import -path=FILE`).
#
#   scripts/run-local.sh                                  # embedded default
#   PHOENIX_INFLUX_URL=http://127.0.0.1:8086 scripts/run-local.sh   # a real InfluxDB (db "phoenix")
#
# Extra arguments go to the agent, e.g. `--log '/var/log/*.log' --drift-path /etc`.
# Env: PHOENIX_LISTEN (default 127.0.0.1:7070), PHOENIX_DATA_DIR (default ./phoenix-data),
# PHOENIX_BIN_DIR=DIR to use binaries already built there instead of building them.
# Exits non-zero if the collector does not come up (port taken, bad flag, bad store).
set -euo pipefail
cd "$(dirname "$0")/.."
LISTEN=${PHOENIX_LISTEN:-127.0.0.1:7070}
HOST=${LISTEN%:*}
PORT=${LISTEN##*:}
DATA=${PHOENIX_DATA_DIR:-./phoenix-data}
unset PHOENIX_LISTEN PHOENIX_DATA_DIR # given as flags below

if [ -n "${PHOENIX_BIN_DIR:-}" ]; then
  BIN=$PHOENIX_BIN_DIR
else
  # ring and the collector's jemalloc build C code: say what is missing before cargo fails.
  for tool in cc make; do
    command -v "$tool" >/dev/null || { echo "run-local: '$tool' not found; the build needs a C toolchain: apt-get install -y build-essential" >&2; exit 1; }
  done
  echo "run-local: building phoenix-agent and phoenix-collector (release; the first build takes a few minutes)" >&2
  cargo build --release -p phoenix-agent -p phoenix-collector
  BIN=./target/release
fi

# Another process on the port would answer our health check and take the agent's reports.
if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
  echo "run-local: $LISTEN is already in use (another collector?); stop it or set PHOENIX_LISTEN=127.0.0.1:PORT" >&2
  exit 1
fi

mkdir -p "$DATA"
"$BIN/phoenix-collector" --listen "$LISTEN" --data-dir "$DATA" &
COLLECTOR=$!
trap 'kill $COLLECTOR ${AGENT:-} 2>/dev/null; wait' EXIT
trap 'exit 130' INT TERM
up=0
for _ in $(seq 100); do
  if ! kill -0 "$COLLECTOR" 2>/dev/null; then
    wait "$COLLECTOR" && rc=0 || rc=$?
    echo "run-local: the collector exited (status $rc) before it was up; its messages are above" >&2
    exit 1
  fi
  if curl -fsS "http://$LISTEN/healthz" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.2
done
if [ "$up" != 1 ]; then
  echo "run-local: the collector did not answer http://$LISTEN/healthz within 20 s" >&2
  exit 1
fi
# The collector generated the tokens it had not been given.
"$BIN/phoenix-agent" run --collector "http://$LISTEN" \
  --token-file "$DATA/tokens/agent.token" --state-dir "$DATA/agent-state" "$@" &
AGENT=$!
echo "collector pid $COLLECTOR, agent pid $AGENT; fleet page http://$LISTEN/ ; API: curl -H \"Authorization: Bearer \$(cat $DATA/tokens/reader.token)\" http://$LISTEN/v1/instances"
wait $AGENT
