#!/usr/bin/env bash
# Collectors as a cluster (issue 15) against the embedded default, in one run, on one
# influxd: fleetsim (tests/src/bin/fleetsim.rs, the real wire format) drives
#   A. one collector with the embedded fleet store (<data-dir>/fleet.json), INSTANCES
#      instances;
#   B. two collectors sharing a throw-away PostgreSQL (--fleet-store), each taking half the
#      fleet (two fleetsims with different id prefixes), as behind a load balancer.
# Prints for each: reports/s acked, collector CPU per report; for B also PostgreSQL's CPU
# (postmaster + backends, reaped ones included) and statements and transactions per report
# (pg_stat_statements calls, pg_stat_database xact_commit), and the decider's table sizes.
#
# Not a test: figures depend on the machine; fleetsim, influxd and PostgreSQL share it.
#   cargo build --release -p phoenix-collector -p phoenix-e2e --bin phoenix-collector --bin fleetsim
#   INSTANCES=2000 INTERVAL=10 DURATION=30 bench/cluster-bench.sh
# Runs as root (PostgreSQL then runs as `postgres` via runuser) or as an ordinary user.
set -euo pipefail

INSTANCES=${INSTANCES:-2000}
INTERVAL=${INTERVAL:-10}
POINTS=${POINTS:-40}
DURATION=${DURATION:-30}
THREADS=${THREADS:-32}
DIR=${DIR:-/tmp/cluster-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COLLECTOR=${COLLECTOR:-$ROOT/target/release/phoenix-collector}
FLEETSIM=${FLEETSIM:-$ROOT/target/release/fleetsim}
PGBIN=${PHOENIX_TEST_PGBIN:-/usr/lib/postgresql/15/bin}
TOKEN=bench-agent-token-0123456789
RTOKEN=bench-recycler-token-0123456789
OTHER=bench-other-token-0123456789

for bin in "$COLLECTOR" "$FLEETSIM" "$PGBIN/initdb"; do
    [ -x "$bin" ] || { echo "missing $bin (cargo build --release -p phoenix-collector -p phoenix-e2e --bin phoenix-collector --bin fleetsim; apt-get install postgresql)" >&2; exit 2; }
done
for c in influxd curl jq python3; do command -v "$c" >/dev/null || { echo "$c not found" >&2; exit 2; }; done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
# A process tree's CPU: the process with its reaped children, plus its live children.
tree_cpu_s() {
    local p=$1 hz total
    hz=$(getconf CLK_TCK)
    total=$(awk -v hz="$hz" '{ sub(/.*\) /, ""); print ($12 + $13 + $14 + $15) / hz }' "/proc/$p/stat")
    for s in /proc/[0-9]*/stat; do
        awk -v hz="$hz" -v pp="$p" '{ sub(/.*\) /, ""); if ($2 == pp) print ($12 + $13) / hz }' "$s" 2>/dev/null
    done | awk -v t="$total" '{ t += $1 } END { print t }'
}

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${PGDATA:-}" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    sleep 1
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

if [ "$(id -u)" = 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi

rm -rf "$DIR"
mkdir -p "$DIR/influx"
INFLUX_PORT=$(free_port); RPC_PORT=$(free_port); PG_PORT=$(free_port)
. "$ROOT/bench/influx-conf.sh"
influx_conf "$DIR/influx" "$INFLUX_PORT" "$RPC_PORT"
influxd -config "$DIR/influx/influxdb.conf" > "$DIR/influxd.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$INFLUX_PORT/ping" >/dev/null && break; sleep 0.2; done
curl -fsS -XPOST "http://127.0.0.1:$INFLUX_PORT/query" --data-urlencode 'q=CREATE DATABASE fleet' >/dev/null

# PostgreSQL: fsync on (as in production), loopback only, trust on loopback TCP.
PGDATA=$DIR/pg
mkdir -p "$PGDATA"
[ "$(id -u)" = 0 ] && chown postgres: "$PGDATA" "$DIR"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
cat >> "$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PGDATA'
shared_preload_libraries = 'pg_stat_statements'
logging_collector = off
EOF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w start >/dev/null
psql_() { as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -At "$@"; }
psql_ -d postgres -c 'CREATE DATABASE phoenix' >/dev/null
psql_ -d phoenix -c 'CREATE EXTENSION pg_stat_statements' >/dev/null
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/phoenix"
POSTMASTER=$(head -1 "$PGDATA/postmaster.pid")

start_collector() { # start_collector PORT DATA_DIR LOG [flags...]
    local port=$1 data=$2 log=$3
    shift 3
    PHOENIX_LOG_LEVEL=${PHOENIX_LOG_LEVEL:-warn} "$COLLECTOR" --listen "127.0.0.1:$port" --data-dir "$data" \
        --influx-url "http://127.0.0.1:$INFLUX_PORT" --influx-db fleet \
        --agent-token "$TOKEN" --recycler-token "$RTOKEN" --pipeline-token "$OTHER" --reader-token "$OTHER" \
        --grace 5s --silent-after 60s "$@" > "$log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
    kill -0 "$LAST_PID" || { cat "$log"; exit 1; }
}
sim() { # sim PORT PREFIX INSTANCES OUT [rounds]
    "$FLEETSIM" --url "http://127.0.0.1:$1" --token "$TOKEN" --prefix "$2" --instances "$3" \
        --interval "$INTERVAL" --points "$POINTS" --duration "$DURATION" --threads "$THREADS" > "$4" 2> "$4.log"
}
warm() { # warm PORT PREFIX INSTANCES: every series exists before a measured run
    "$FLEETSIM" --url "http://127.0.0.1:$1" --token "$TOKEN" --prefix "$2" --instances "$3" \
        --points "$POINTS" --threads "$THREADS" --rounds 1 --duration 3600 > /dev/null 2>&1
}

echo "fleet: $INSTANCES instances every ${INTERVAL}s, $POINTS points per report, ${DURATION}s per run; $(nproc) cores"

# A. one embedded collector.
PA=$(free_port)
start_collector "$PA" "$DIR/a" "$DIR/a.log"; A=$LAST_PID
warm "$PA" "emb-" "$INSTANCES"
a0=$(cpu_s "$A"); t0=$(date +%s.%N)
sim "$PA" "emb-" "$INSTANCES" "$DIR/a.json"
a1=$(cpu_s "$A"); t1=$(date +%s.%N)
kill "$A"; wait "$A" 2>/dev/null || true

# B. two collectors, one PostgreSQL, half the fleet each.
P1=$(free_port); P2=$(free_port)
start_collector "$P1" "$DIR/b1" "$DIR/b1.log" --fleet-store "$PG_URL"; B1=$LAST_PID
start_collector "$P2" "$DIR/b2" "$DIR/b2.log" --fleet-store "$PG_URL"; B2=$LAST_PID
HALF=$((INSTANCES / 2))
warm "$P1" "c1-" "$HALF" & W1=$!
warm "$P2" "c2-" "$HALF" & W2=$!
wait "$W1" "$W2"
psql_ -d phoenix -c 'SELECT pg_stat_statements_reset()' >/dev/null
x0=$(psql_ -d phoenix -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'phoenix'")
b10=$(cpu_s "$B1"); b20=$(cpu_s "$B2"); g0=$(tree_cpu_s "$POSTMASTER"); u0=$(date +%s.%N)
sim "$P1" "c1-" "$HALF" "$DIR/b1.json" & S1=$!
sim "$P2" "c2-" "$HALF" "$DIR/b2.json" & S2=$!
wait "$S1" "$S2"
b11=$(cpu_s "$B1"); b21=$(cpu_s "$B2"); g1=$(tree_cpu_s "$POSTMASTER"); u1=$(date +%s.%N)
x1=$(psql_ -d phoenix -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'phoenix'")
stmts=$(psql_ -d phoenix -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'phoenix')")
top=$(psql_ -d phoenix -F ' | ' -c "SELECT calls, round(total_exec_time::numeric, 0) || ' ms', left(regexp_replace(query, '\s+', ' ', 'g'), 70) FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'phoenix') ORDER BY total_exec_time DESC LIMIT 6")
sizes=$(psql_ -d phoenix -F ' ' -c "SELECT relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid)) FROM pg_stat_user_tables WHERE relname IN ('phoenix_reports', 'phoenix_fleet') ORDER BY relname")
decider=$( (curl -fsS "http://127.0.0.1:$P1/healthz"; curl -fsS "http://127.0.0.1:$P2/healthz") | jq -s '[.[].decider]')

okA=$(jq .reports_ok "$DIR/a.json"); okB=$(( $(jq .reports_ok "$DIR/b1.json") + $(jq .reports_ok "$DIR/b2.json") ))
awk -v okA="$okA" -v okB="$okB" -v a0="$a0" -v a1="$a1" -v t0="$t0" -v t1="$t1" \
    -v b10="$b10" -v b11="$b11" -v b20="$b20" -v b21="$b21" -v g0="$g0" -v g1="$g1" -v u0="$u0" -v u1="$u1" \
    -v x="$((x1 - x0))" -v st="$stmts" -v wantA="$(jq .wanted_reports_per_s "$DIR/a.json")" \
    -v errA="$(jq '.errors + .unavailable' "$DIR/a.json")" \
    -v errB="$(( $(jq '.errors + .unavailable' "$DIR/b1.json") + $(jq '.errors + .unavailable' "$DIR/b2.json") ))" 'BEGIN {
    wa = t1 - t0; wb = u1 - u0
    printf "A embedded, 1 collector:  %.0f reports/s (wanted %.0f), %d errors/503; collector CPU %.0f us/report (%.2f cores)\n", okA / wa, wantA, errA, (a1 - a0) / okA * 1e6, (a1 - a0) / wa
    printf "B PostgreSQL, 2 collectors: %.0f reports/s, %d errors/503; collector CPU %.0f us/report (%.2f cores for both)\n", okB / wb, errB, (b11 - b10 + b21 - b20) / okB * 1e6, (b11 - b10 + b21 - b20) / wb
    printf "  PostgreSQL CPU:           %.0f us/report (%.2f cores)\n", (g1 - g0) / okB * 1e6, (g1 - g0) / wb
    printf "  statements per report:    %.3f (%d in %.0f s); transactions per report %.3f\n", st / okB, st, wb, x / okB
}'
echo "  deciders (collector 1, 2): $decider"
echo "  tables:"; sed 's/^/    /' <<<"$sizes"
echo "  statements by time (calls | total | query):"; sed 's/^/    /' <<<"$top"
