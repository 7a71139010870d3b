#!/usr/bin/env bash
# Start the Ray head of a manual multi-node cluster on this machine.
#
#   launch/start_head.sh [extra `ray start` options]
#
# Then on every other machine:   launch/start_worker.sh <head-ip>:<port>
# and on this machine:           RAY_ADDRESS=<head-ip>:<port> python -m ds3dist.launch ...
#
# Environment (all optional):
#   RAY_PORT       GCS port of the head (default 6379)
#   NODE_IP        the address other nodes reach this one at (default: the IPv4 address of
#                  RAY_NET_IFACE if set, else the first address of `hostname -I`)
#   RAY_NET_IFACE  network interface whose address to use (e.g. ib0, eth0)
#   RAY_TEMP_DIR   Ray's temp dir on this node (default /tmp/ray-ds3dist-<hostname>)
#   NUM_GPUS       GPUs to offer (default: Ray's detection)
#   NUM_CPUS       CPUs to offer (default: Ray's detection)
#   RAY_BLOCK      1 (default): stay in the foreground; Ctrl-C or SIGTERM stops exactly the
#                  Ray processes started here. 0: daemonize (stop them with `ray stop` on
#                  this node, which stops every Ray process of this user here).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/node_ip.sh"
port=${RAY_PORT:-6379}
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-ds3dist-$(hostname -s)}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

args=(--head --node-ip-address="$ip_addr" --port="$port" --temp-dir="$temp_dir"
      --include-dashboard=false --disable-usage-stats)
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus="$NUM_GPUS")
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus="$NUM_CPUS")
[[ "${RAY_BLOCK:-1}" == 1 ]] && args+=(--block)

echo "Ray head at $ip_addr:$port (temp dir $temp_dir)"
echo "  workers:  launch/start_worker.sh $ip_addr:$port"
echo "  driver:   RAY_ADDRESS=$ip_addr:$port python -m ds3dist.launch +parallel=<layout> ..."
exec ray start "${args[@]}" "$@"
