#!/usr/bin/env bash
#SBATCH --job-name=ds3dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=ds3dist-%j.out
#
# Run a ds3dist batch job on a multi-node Slurm allocation:
#
#   sbatch --nodes=2 slurm/run.sh model=deepseek_v3 model.path=/data/DeepSeek-V3 \
#       +parallel=pp2ep8 execution=fp8 job.input=requests.jsonl job.output=results.jsonl
#
# One Ray node per Slurm node: the head on the node running this script, workers on the
# others (each started with `srun ... ray start --block`, its own --node-ip-address and
# --temp-dir). Once all nodes have registered, `python -m ds3dist.launch "$@"` runs here with
# RAY_ADDRESS pointing at the head. On exit (success, failure, scancel or time limit) only
# the srun steps started here are stopped, which stops exactly the Ray processes they ran.
#
# Environment (all optional):
#   DS3DIST_VENV   virtualenv to activate first (default: the environment sbatch passed on)
#   RAY_PORT       head GCS port (default 6379)
#   RAY_NET_IFACE  interface whose IPv4 address the nodes use (e.g. ib0); default: the first
#                  address of `hostname -I` on each node
#   RAY_TMP_ROOT   parent of the per-node Ray temp dirs (default /tmp)
#   RAY_WAIT_S     seconds to wait for all nodes to register (default 600)
set -euo pipefail

if [[ -n "${DS3DIST_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$DS3DIST_VENV/bin/activate"
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# Ray starts workers at nice 15; the ranks are the job's computation, so run them at 0.
export RAY_worker_niceness=${RAY_worker_niceness:-0}
unset RAY_ADDRESS

job_id=${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}
ray_port=${RAY_PORT:-6379}
wait_s=${RAY_WAIT_S:-600}
tmp_root=${RAY_TMP_ROOT:-/tmp}
gpus_per_node=${SLURM_GPUS_PER_NODE:-0}
gpus_per_node=${gpus_per_node##*:}   # "h100:8" -> "8"
cpus_per_node=${SLURM_CPUS_PER_TASK:-}

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${SLURMD_NODENAME:-$(hostname -s)}   # this script runs on the head
workers=()
for n in "${nodes[@]}"; do
    [[ "$n" != "$head_node" ]] && workers+=("$n")
done
num_nodes=${#nodes[@]}
if (( ${#workers[@]} != num_nodes - 1 )); then
    echo "run.sh: this node ($head_node) is not in the allocation (${nodes[*]})" >&2
    exit 1
fi

# The node's IPv4 address (exported so the srun'd shells on the other nodes have it too).
node_ip() {
    if [[ -n "${RAY_NET_IFACE:-}" ]]; then
        ip -4 -o addr show dev "$RAY_NET_IFACE" | awk '{split($4, a, "/"); print a[1]; exit}'
    else
        hostname -I | awk '{print $1}'
    fi
}
export -f node_ip

head_ip=$(node_ip)
if [[ -z "$head_ip" ]]; then
    echo "run.sh: cannot determine the head node's IP address (set RAY_NET_IFACE)" >&2
    exit 1
fi
export RAY_HEAD_ADDRESS="$head_ip:$ray_port"
echo "ds3dist: $num_nodes nodes (${nodes[*]}), $gpus_per_node GPUs each; Ray head $RAY_HEAD_ADDRESS"

resource_args=(--num-gpus="$gpus_per_node")
[[ -n "$cpus_per_node" ]] && resource_args+=(--num-cpus="$cpus_per_node")
export RAY_RESOURCE_ARGS="${resource_args[*]}"

step_pids=()
# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if (( ${#step_pids[@]} )); then
        echo "ds3dist: stopping the Ray nodes started by this job (srun steps ${step_pids[*]})"
        kill -TERM "${step_pids[@]}" 2>/dev/null || true
        for _ in $(seq 1 30); do
            local alive=0
            for p in "${step_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
            (( alive )) || break
            sleep 1
        done
        kill -KILL "${step_pids[@]}" 2>/dev/null || true
        wait "${step_pids[@]}" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# The per-node commands below are single-quoted on purpose: they expand on their own node.
export RAY_PORT_="$ray_port" RAY_TEMP_PREFIX="$tmp_root/ray-$job_id"

# Head: on this node, in its own srun step (so stopping the step stops its processes).
# shellcheck disable=SC2016
srun --nodes=1 --ntasks=1 --nodelist="$head_node" --kill-on-bad-exit=0 \
    bash -c 'exec ray start --head --block --node-ip-address="$(node_ip)" --port="$RAY_PORT_" \
                 --temp-dir="$RAY_TEMP_PREFIX-$(hostname -s)" --include-dashboard=false --disable-usage-stats \
                 $RAY_RESOURCE_ARGS' &
step_pids+=($!)

# Workers: one task per other node, each with its own IP and temp dir; each waits for the
# head's port to open first.
if (( ${#workers[@]} )); then
    worker_list=$(IFS=,; echo "${workers[*]}")
    # shellcheck disable=SC2016
    srun --nodes="${#workers[@]}" --ntasks="${#workers[@]}" --ntasks-per-node=1 \
        --nodelist="$worker_list" --kill-on-bad-exit=0 \
        bash -c 'for _ in $(seq 1 60); do
                     (exec 3<>"/dev/tcp/${RAY_HEAD_ADDRESS%:*}/${RAY_HEAD_ADDRESS##*:}") \
                         2>/dev/null && break
                     sleep 2
                 done
                 exec ray start --block --address="$RAY_HEAD_ADDRESS" \
                     --node-ip-address="$(node_ip)" --disable-usage-stats \
                     --temp-dir="$RAY_TEMP_PREFIX-$(hostname -s)" $RAY_RESOURCE_ARGS' &
    step_pids+=($!)
fi

# Wait until every node has registered with the head (or give up after $wait_s seconds).
python - "$RAY_HEAD_ADDRESS" "$num_nodes" "$wait_s" <<'PY'
import sys
import time

import ray

address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        break
    except Exception as e:  # the head is not up yet
        if time.monotonic() > deadline:
            sys.exit(f"run.sh: the Ray head at {address} did not come up in {timeout:.0f} s: {e}")
        time.sleep(3)
while True:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) >= want:
        gpus = ray.cluster_resources().get("GPU", 0)
        print(f"ds3dist: {len(alive)}/{want} Ray nodes registered, {gpus:.0f} GPUs", flush=True)
        break
    if time.monotonic() > deadline:
        sys.exit(f"run.sh: only {len(alive)} of {want} Ray nodes registered within "
                 f"{timeout:.0f} s: " + ", ".join(n["NodeManagerAddress"] for n in alive))
    time.sleep(3)
ray.shutdown()
PY

export RAY_ADDRESS="$RAY_HEAD_ADDRESS"
set +e
python -m ds3dist.launch "$@"
rc=$?
set -e
echo "ds3dist: launch exited with $rc"
exit "$rc"
