#!/usr/bin/env bash
# Example recycler for an AWS auto-scaling group: polls the collector's phoenix queue, tells the
# ASG each marked instance is unhealthy (the ASG then terminates and replaces it), and acks the
# mark. Phoenix decides what is sick and keeps marks within its budget; this script only acts.
#
#   PHOENIX_URL=https://collector:7070 PHOENIX_RECYCLER_TOKEN_FILE=/etc/phoenix/recycler.token \
#     asg-recycler.sh            # poll every PHOENIX_POLL_INTERVAL seconds (default 30)
#   asg-recycler.sh --once       # one poll, then exit (cron, tests)
#
# Env: PHOENIX_URL (required); PHOENIX_RECYCLER_TOKEN or PHOENIX_RECYCLER_TOKEN_FILE;
# PHOENIX_POLL_INTERVAL; PHOENIX_DRY_RUN=1 prints what it would do; AWS_* as the aws CLI reads
# them (region, profile). Needs: bash, curl, jq, aws (CLI v2).
# The IAM policy needs autoscaling:SetInstanceHealth, nothing else.
#
# Nothing from the collector's answer reaches a shell: ids are checked against the EC2 id
# syntax and passed to aws and curl as single arguments. The token goes to curl on stdin, not
# on its command line, so other users cannot read it in ps.
set -euo pipefail

die() { printf 'asg-recycler: %s\n' "$*" >&2; exit 2; }
log() { printf '%s asg-recycler: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

once=0
case "${1:-}" in
  --once) once=1 ;;
  "") ;;
  # The whole header comment, however long it grows.
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; use --once or nothing" ;;
esac

url="${PHOENIX_URL:-}"
[ -n "$url" ] || die "set PHOENIX_URL to the collector's base URL, e.g. https://collector:7070"
url="${url%/}"
token="${PHOENIX_RECYCLER_TOKEN:-}"
if [ -z "$token" ] && [ -n "${PHOENIX_RECYCLER_TOKEN_FILE:-}" ]; then
  token="$(tr -d '[:space:]' < "$PHOENIX_RECYCLER_TOKEN_FILE")"
fi
[ -n "$token" ] || die "set PHOENIX_RECYCLER_TOKEN or PHOENIX_RECYCLER_TOKEN_FILE (the collector's --recycler-token)"
interval="${PHOENIX_POLL_INTERVAL:-30}"
[[ "$interval" =~ ^[0-9]+$ ]] || die "PHOENIX_POLL_INTERVAL must be whole seconds"
for tool in curl jq; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
if [ "${PHOENIX_DRY_RUN:-0}" != 1 ]; then
  command -v aws >/dev/null || die "the aws CLI is not installed (or set PHOENIX_DRY_RUN=1)"
fi

# curl with the bearer token read from stdin (-H @-), never on the command line.
api() {
  printf 'Authorization: Bearer %s\n' "$token" | curl -fsS --max-time 20 -H @- "$@"
}

poll() {
  local body ids id
  if ! body="$(api "$url/v1/phoenix")"; then
    log "cannot read $url/v1/phoenix; retrying next poll"
    return 0
  fi
  if [ "$(jq -r '.alerts | length' <<<"$body")" != 0 ]; then
    log "collector alert(s): $(jq -r '[.alerts[].message] | join("; ")' <<<"$body")"
  fi
  ids="$(jq -r '.marked[] | select(.state == "marked") | .instance_id' <<<"$body")"
  while IFS= read -r id; do
    [ -n "$id" ] || continue
    # EC2 instance ids only: anything else is not ours to touch (or not an id at all).
    if ! [[ "$id" =~ ^i-[0-9a-f]+$ ]]; then
      log "skipping ${id@Q}: not an EC2 instance id"
      continue
    fi
    local why
    why="$(jq -r --arg id "$id" '.marked[] | select(.instance_id == $id) | "\(.reason): \(.evidence); marked at \(.since_at // "?")"' <<<"$body")"
    if [ "${PHOENIX_DRY_RUN:-0}" = 1 ]; then
      log "dry run: would run aws autoscaling set-instance-health --instance-id $id --health-status Unhealthy ($why)"
      continue
    fi
    log "replacing $id ($why)"
    if ! aws autoscaling set-instance-health --instance-id "$id" --health-status Unhealthy --no-should-respect-grace-period; then
      log "aws refused $id; not acking, retrying next poll"
      continue
    fi
    # Acked only after the ASG took it: a failed ack just repeats the (idempotent) call.
    if api -X POST "$url/v1/phoenix/$id/ack" >/dev/null; then
      log "acked $id"
    else
      log "ack of $id failed (mark withdrawn or collector unreachable); the next poll sees"
    fi
  done <<<"$ids"
}

while :; do
  poll
  [ "$once" = 1 ] && exit 0
  sleep "$interval"
done
