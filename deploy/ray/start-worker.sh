#!/usr/bin/env bash
# Join a worker node to the Ray cluster started by start-head.sh.
#
#   deploy/ray/start-worker.sh HEAD_IP:PORT [RESOURCES_JSON]
#
# The node advertises a custom resource (default {"gpu_node": 1} on a machine with an NVIDIA
# GPU, {"cpu_node": 1} otherwise) that placement.json uses to pin experts to it. Ray detects
# the GPUs itself (num_gpus). Copy the head's ~/.ray/auth_token here first: Ray's token
# authentication is on and a node without the token is refused.
# Environment: RAY_METRICS_PORT (8080, Ray's own metrics), RAY_START_ARGS (extra `ray start` flags).
set -euo pipefail

ADDRESS=${1:?usage: start-worker.sh HEAD_IP:PORT [RESOURCES_JSON]}
if [[ -n "${2:-}" ]]; then
    RESOURCES=$2
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    RESOURCES='{"gpu_node": 1}'
else
    RESOURCES='{"cpu_node": 1}'
fi

export RAY_AUTH_MODE=token
if [[ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    echo "no Ray auth token: copy the head's ~/.ray/auth_token to this machine" >&2
    exit 1
fi
# Experts at the gateway's priority, not Ray's default nice 15: under load a restarted expert
# otherwise waits tens of seconds for CPU.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags on purpose.
ray start --address "$ADDRESS" --resources "$RESOURCES" --metrics-export-port "${RAY_METRICS_PORT:-8080}" ${RAY_START_ARGS:-}
