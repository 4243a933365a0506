#!/usr/bin/env bash
# Start the Ray head node and the dynaroute gateway on it, for machines you already have.
#
#   deploy/ray/start-head.sh BUNDLE_DIR [PLACEMENT_JSON]
#
# Environment: RAY_PORT (6379), GATEWAY_PORT (50051), METRICS_PORT (9464), GATEWAY_HOST
# (127.0.0.1: set 0.0.0.0 only together with TLS and a token, see docs/operations.md),
# DYNAROUTE_SERVE_ARGS (extra `dynaroute serve` flags, e.g. "--tls-cert ... --auth-token-file ..."),
# RAY_METRICS_PORT (8080, Ray's own metrics), RAY_START_ARGS (extra `ray start` flags).
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
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags on purpose.
ray start --head --port "$RAY_PORT" --dashboard-host 127.0.0.1 --metrics-export-port "${RAY_METRICS_PORT:-8080}" \
    --num-cpus "${HEAD_NUM_CPUS:-2}" ${RAY_START_ARGS:-}

args=(serve "$BUNDLE" --ray-address auto --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" --metrics-port "$METRICS_PORT")
if [[ -n "$PLACEMENT" ]]; then
    args+=(--placement "$PLACEMENT")
fi
# shellcheck disable=SC2086  # DYNAROUTE_SERVE_ARGS is a list of flags on purpose.
nohup dynaroute "${args[@]}" ${DYNAROUTE_SERVE_ARGS:-} >"${LOG:-$HOME/dynaroute-gateway.log}" 2>&1 &
echo "gateway pid $! on $GATEWAY_HOST:$GATEWAY_PORT (metrics :$METRICS_PORT); log ${LOG:-$HOME/dynaroute-gateway.log}"
echo "workers join with: deploy/ray/start-worker.sh $(hostname -I | awk '{print $1}'):$RAY_PORT"
