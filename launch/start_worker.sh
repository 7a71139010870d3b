#!/usr/bin/env bash
# Join this machine to a Ray cluster started with launch/start_head.sh.
#
#   launch/start_worker.sh <head-ip>:<port> [extra `ray start` options]
#
# Environment (all optional): NODE_IP, RAY_NET_IFACE, RAY_TEMP_DIR, NUM_GPUS, NUM_CPUS,
# RAY_BLOCK, as for start_head.sh (RAY_TEMP_DIR defaults to /tmp/ray-ds3dist-<hostname>).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 <head-ip>:<port> [extra ray start options]" >&2
    exit 2
fi
head_address=$1
shift

source "$(dirname "${BASH_SOURCE[0]}")/node_ip.sh"
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-ds3dist-$(hostname -s)}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

args=(--address="$head_address" --node-ip-address="$ip_addr" --temp-dir="$temp_dir"
      --disable-usage-stats)
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus="$NUM_GPUS")
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus="$NUM_CPUS")
[[ "${RAY_BLOCK:-1}" == 1 ]] && args+=(--block)

echo "Ray worker $ip_addr joining $head_address (temp dir $temp_dir)"
exec ray start "${args[@]}" "$@"
