#!/usr/bin/env bash
# What the PostgreSQL fleet store costs the database (docs/scaling.md): a throw-away
# PostgreSQL 15 (fsync on, pg_stat_statements) and COLLECTORS collector-side stores fed a
# simulated fleet of INSTANCES at INTERVAL seconds for SECONDS simulated seconds, each store
# flushing once a second (tests/src/bin/pgstore-bench.rs). Prints one JSON line: reports/s
# sustained, flush latency, PostgreSQL CPU per 1,000 reports, statements per report, sizes.
#
# The parts' cost only (the store's batch module, not what --fleet-store wires); the cluster
# against one embedded collector is bench/cluster-bench.sh. Runs as root
# (PostgreSQL then runs as `postgres`) or as any user with /usr/lib/postgresql/15/bin.
#   cargo build --release -p phoenix-e2e --bin pgstore-bench
#   INSTANCES=100000 INTERVAL=10 SIM_SECONDS=30 bench/pgstore-bench.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/pgstore-bench}
[ -x "$BIN" ] || BIN=$ROOT/target/debug/pgstore-bench
[ -x "$BIN" ] || { echo "missing pgstore-bench: cargo build --release -p phoenix-e2e --bin pgstore-bench" >&2; exit 2; }
[ -x /usr/lib/postgresql/15/bin/initdb ] || [ -n "${PHOENIX_TEST_PGBIN:-}" ] || {
    echo "PostgreSQL 15 not found: apt-get install -y postgresql" >&2; exit 2; }
echo "using $BIN" >&2
exec "$BIN" --instances "${INSTANCES:-100000}" --interval "${INTERVAL:-10}" \
    --seconds "${SIM_SECONDS:-30}" --collectors "${COLLECTORS:-2}" \
    --obs-every "${OBS_EVERY:-10}"
