#!/usr/bin/env bash
# The main job on one machine: a collector plus a local agent shipping this host's metrics
# (and, if given, log files) to it. Without PHOENIX_INFLUX_URL the collector writes line
# protocol under ./phoenix-data/influx (import with `influx -import -path=FILE`).
#
#   scripts/run-local.sh                                  # embedded default
#   PHOENIX_INFLUX_URL=http://127.0.0.1:8086 scripts/run-local.sh   # a real InfluxDB (db "phoenix")
#
# Extra arguments go to the agent, e.g. `--log '/var/log/*.log' --drift-path /etc`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p phoenix-agent -p phoenix-collector
DATA=${PHOENIX_DATA_DIR:-./phoenix-data}
mkdir -p "$DATA"
./target/release/phoenix-collector --listen 127.0.0.1:7070 --data-dir "$DATA" &
COLLECTOR=$!
trap 'kill $COLLECTOR ${AGENT:-} 2>/dev/null; wait' EXIT INT TERM
for _ in $(seq 50); do curl -fsS http://127.0.0.1:7070/healthz >/dev/null 2>&1 && break; sleep 0.2; done
# The collector generated the tokens it had not been given.
./target/release/phoenix-agent run --collector http://127.0.0.1:7070 \
  --token-file "$DATA/tokens/agent.token" --state-dir "$DATA/agent-state" "$@" &
AGENT=$!
echo "collector pid $COLLECTOR, agent pid $AGENT; fleet: curl -H \"Authorization: Bearer \$(cat $DATA/tokens/reader.token)\" http://127.0.0.1:7070/v1/instances"
wait $AGENT
