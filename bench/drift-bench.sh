#!/usr/bin/env bash
# Drift scan speed: phoenix-agent against AIDE 0.18 (sha256 + perms + owner + type) and b3sum
# (the raw read-and-hash floor), over the same trees, warm and cold, in one run.
#
#   apt-get install -y aide b3sum          # peers (Debian packages)
#   cargo build --release -p phoenix-agent
#   bench/drift-bench.sh                   # TREES="/etc /usr/share" REPS=3 AIDE_REPS=1 COLD=1
#
# Warm = the tree read once before timing. Cold = `sync; echo 3 > /proc/sys/vm/drop_caches`
# before each timed run (needs root; skipped with a note otherwise). Each figure is the median
# of its runs, wall clock. Phoenix is timed twice: `bake` (scan + write manifest) and `drift`
# (read manifest + scan + diff), each a whole process run like the peers. AIDE is timed for
# --init and --check; its /usr/share runs take ~30 s each, so AIDE_REPS defaults to 1.
# Nothing is modified; all scratch files live under $WORK.
set -euo pipefail

TREES=${TREES:-"/etc /usr/share"}
REPS=${REPS:-3}
AIDE_REPS=${AIDE_REPS:-1}
COLD=${COLD:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${AGENT:-$ROOT/target/release/phoenix-agent}
WORK=${WORK:-$(mktemp -d /tmp/drift-bench.XXXXXX)}

for tool in aide b3sum; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y aide b3sum" >&2; exit 2; }
done
[ -x "$AGENT" ] || { echo "no agent binary at $AGENT: cargo build --release -p phoenix-agent (or set AGENT=)" >&2; exit 2; }

can_drop=0
if [ "$COLD" = 1 ]; then
    if sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then can_drop=1; else echo "note: cannot drop caches (not root?); cold runs skipped" >&2; fi
fi

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# time_cmd MODE REPS CMD...: median wall seconds of REPS runs; MODE warm|cold. Exit codes 0 and
# 1 (drifted) count as success for drift, AIDE's --check uses bits 1-7 for differences.
time_cmd() {
    local mode=$1 reps=$2; shift 2
    local times=() i t0 t1 rc
    for ((i = 0; i < reps; i++)); do
        [ "$mode" = cold ] && drop
        t0=$(date +%s.%N)
        set +e
        "$@" >/dev/null 2>"$WORK/last.err"
        rc=$?
        set -e
        t1=$(date +%s.%N)
        if [ "$rc" -gt 7 ]; then
            echo "failed ($rc): $*" >&2
            cat "$WORK/last.err" >&2
            echo "nan"
            return
        fi
        times+=("$(echo "$t1 - $t0" | bc -l)")
    done
    printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.4f\n", a[int((NR+1)/2)]}'
}

b3() { find "$1" -type f -print0 | xargs -0 -r b3sum >/dev/null; }

aide_conf() { # tree -> config file path
    local tree=$1 dir=$WORK/aide-$(echo "$1" | tr / _)
    mkdir -p "$dir"
    cat >"$dir/aide.conf" <<EOF
database_in=file:$dir/aide.db
database_out=file:$dir/aide.db.new
gzip_dbout=no
report_url=stdout
num_workers=1
Bench = p+u+g+ftype+sha256
$tree Bench
EOF
    echo "$dir"
}

aide_init() { aide --init -c "$1/aide.conf"; }
aide_check() { aide --check -c "$1/aide.conf"; }

ratio() { if [ "$2" = nan ] || [ "$1" = nan ]; then echo "-"; else echo "scale=2; $1 / $2" | bc -l; fi; }

rows=()
for tree in $TREES; do
    [ -d "$tree" ] || { echo "skipping $tree: not a directory" >&2; continue; }
    files=$(find "$tree" -type f | wc -l)
    bytes=$(find "$tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    base=$WORK/base-$(echo "$tree" | tr / _).json
    bake() { "$AGENT" bake --drift-path "$tree" --image-id bench --out "$base"; }
    check() { "$AGENT" drift --baseline "$base"; }
    adir=$(aide_conf "$tree")
    # Warm-up, and the databases/manifest the checks need.
    b3 "$tree"; bake; aide_init "$adir" >/dev/null 2>&1 || true; mv -f "$adir/aide.db.new" "$adir/aide.db"
    for mode in warm cold; do
        [ "$mode" = cold ] && [ "$can_drop" = 0 ] && continue
        tb=$(time_cmd "$mode" "$REPS" b3 "$tree")
        tp=$(time_cmd "$mode" "$REPS" bake)
        td=$(time_cmd "$mode" "$REPS" check)
        ti=$(time_cmd "$mode" "$AIDE_REPS" aide_init "$adir")
        tc=$(time_cmd "$mode" "$AIDE_REPS" aide_check "$adir")
        rows+=("$tree|$files files, $((bytes / 1048576)) MiB|$mode|$tb|$tp|$td|$ti|$tc|$(ratio "$tp" "$tb")|$(ratio "$td" "$tb")|$(ratio "$tc" "$td")")
    done
done

echo
echo "drift scan, median wall seconds (phoenix: $AGENT; $(aide -v 2>&1 | head -1); $(b3sum --version))"
echo
echo "| tree | size | cache | b3sum | phoenix bake | phoenix drift | aide --init | aide --check | bake/b3sum | drift/b3sum | aide check/phoenix drift |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for r in "${rows[@]}"; do echo "| ${r//|/ | } |"; done
echo
echo "scratch files in $WORK"
