#!/usr/bin/env bash
# Start the Ray head node and the dynaroute gateway on it, for machines you already have.
#
#   deploy/ray/start-head.sh BUNDLE_DIR [PLACEMENT_JSON]
#
# Environment: RAY_PORT (6379), GATEWAY_PORT (50051), METRICS_PORT (9464), GATEWAY_HOST
# (127.0.0.1: set 0.0.0.0 only together with TLS and a token, see docs/operations.md),
# DYNAROUTE_SERVE_ARGS (extra `dynaroute serve` flags, e.g. "--tls-cert ... --auth-token-file ..."),
# RAY_METRICS_PORT (8080, Ray's own metrics), RAY_START_ARGS (extra `ray start` flags),
# READY_TIMEOUT_S (120, the gateway's --ready-timeout-s), LOG ($HOME/dynaroute-gateway.log),
# STARTUP_WAIT_S (300: how long this script watches the gateway start before it returns).
#
# Ray's token authentication stays on: the head uses ~/.ray/auth_token (created here when
# missing); copy that file to every worker before it joins.
set -euo pipefail

BUNDLE=${1:?usage: start-head.sh BUNDLE_DIR [PLACEMENT_JSON]}
PLACEMENT=${2:-}
RAY_PORT=${RAY_PORT:-6379}
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
GATEWAY_PORT=${GATEWAY_PORT:-50051}
METRICS_PORT=${METRICS_PORT:-9464}

export RAY_AUTH_MODE=token
ray get-auth-token --generate >/dev/null

# HEAD_NUM_CPUS (2): the CPUs Ray may give expert actors on the head; 0 leaves the head's
# cores to the gateway (router, batching) and puts every expert on a worker.
# The dashboard process (loopback only, behind the token) is what writes the list of Ray's
# metrics endpoints that Prometheus follows (deploy/prometheus); it needs `ray[default]`.
# Experts at the gateway's priority, not Ray's default nice 15: under load a restarted expert
# otherwise waits tens of seconds for CPU.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags on purpose.
ray start --head --port "$RAY_PORT" --dashboard-host 127.0.0.1 --metrics-export-port "${RAY_METRICS_PORT:-8080}" \
    --num-cpus "${HEAD_NUM_CPUS:-2}" ${RAY_START_ARGS:-}

# The head's own address, never `auto` (which joins whichever cluster it finds first, another
# job's included). READY_TIMEOUT_S (120): how long the gateway waits for a worker that can hold
# the placement, then for the experts to load.
args=(serve "$BUNDLE" --ray-address "127.0.0.1:$RAY_PORT" --ready-timeout-s "${READY_TIMEOUT_S:-120}"
      --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" --metrics-port "$METRICS_PORT")
if [[ -n "$PLACEMENT" ]]; then
    args+=(--placement "$PLACEMENT")
fi
LOG=${LOG:-$HOME/dynaroute-gateway.log}
# shellcheck disable=SC2086  # DYNAROUTE_SERVE_ARGS is a list of flags on purpose.
nohup dynaroute "${args[@]}" ${DYNAROUTE_SERVE_ARGS:-} >"$LOG" 2>&1 &
pid=$!
join="deploy/ray/start-worker.sh $(hostname -I | awk '{print $1}'):$RAY_PORT"

# Report what the gateway did, not only that it was started: serving, waiting for a worker
# that can hold the placement, or exited (a bad bundle or placement is refused at once).
for ((i = 0; i < ${STARTUP_WAIT_S:-300}; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" || true
        echo "the gateway exited; its log ($LOG) ends:" >&2
        tail -n 5 "$LOG" >&2
        exit 1
    fi
    if grep -q "dynaroute: serving" "$LOG"; then
        echo "gateway pid $pid serving on $GATEWAY_HOST:$GATEWAY_PORT (metrics :$METRICS_PORT); log $LOG"
        echo "workers join with: $join"
        exit 0
    fi
    if grep -q "waiting up to" "$LOG"; then
        grep "waiting up to" "$LOG" | tail -n 1
        echo "gateway pid $pid starts once a worker that can hold the placement joins: $join; log $LOG"
        exit 0
    fi
    sleep 1
done
echo "gateway pid $pid is still starting after ${STARTUP_WAIT_S:-300} s; log $LOG"
echo "workers join with: $join"
