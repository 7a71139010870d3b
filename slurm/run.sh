#!/usr/bin/env bash
#SBATCH --job-name=ds3dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=ds3dist-%j.out
#
# Run a ds3dist batch job on a multi-node Slurm allocation:
#
#   sbatch --nodes=2 slurm/run.sh model=deepseek_v3 model.path=/data/DeepSeek-V3 \
#       +parallel=pp2ep8 execution=fp8 job.input=requests.jsonl job.output=results.jsonl
#
# One Ray node per Slurm node: the head on the node running this script, workers on the
# others (each started with `srun ... ray start --block`, its own --node-ip-address and
# --temp-dir). Once all nodes have registered, `python -m ds3dist.launch "$@"` runs in an srun
# step of its own on this node (`--overlap`: it shares the node with the Ray head) with
# RAY_ADDRESS pointing at the head. On exit (success, failure, scancel or time limit) only
# the srun steps started here are stopped, which stops exactly the Ray processes they ran.
#
# Stopping early. On SIGTERM or SIGINT the launch admits no more requests, lets those in
# flight finish for up to runtime.drain_timeout_s (default 20 s), writes their lines and exits
# with 75; a second signal stops it at once. Every line written stays valid: submitting the
# same command again skips the ids already in the output and finishes the job.
#   - Time limit: `--signal=B:TERM@120` above sends SIGTERM to this script 120 s before the
#     end. The script passes it on to the launch (the Ray nodes keep running, so the requests
#     in flight can finish), waits up to DS3DIST_STOP_S for it, then stops the Ray nodes.
#     `scancel --batch --signal=TERM JOBID` does the same at any time.
#   - `scancel --signal=TERM JOBID` signals every srun step at once, not this script: the
#     launch stops as above while the Ray nodes shut down under it (requests cut short are
#     run again by the rerun); then this script stops what is left and exits.
#
# Exit code: the launch's (0 done, 1 engine or unexpected error, 2 bad config or input,
# 75 stopped early: rerun to finish); 1 when the Ray nodes do not come up; 143 or 130 on
# SIGTERM or SIGINT before the launch started.
#
# Environment (all optional):
#   DS3DIST_VENV   virtualenv to activate first (default: the environment sbatch passed on)
#   DS3DIST_STOP_S seconds the launch gets to stop after a signal before its step is ended
#                  (default 60; keep it above runtime.drain_timeout_s)
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
# On SIGTERM `ray start --block` first drains its node for up to this long (for Ray Serve);
# here every Ray process of the step gets the SIGTERM too, so that would only wait.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
unset RAY_ADDRESS

job_id=${SLURM_JOB_ID:?run this script with sbatch (or inside an salloc allocation)}
ray_port=${RAY_PORT:-6379}
wait_s=${RAY_WAIT_S:-600}
tmp_root=${RAY_TMP_ROOT:-/tmp}
stop_s=${DS3DIST_STOP_S:-60}
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

step_pids=()    # the srun steps started here: Ray head, Ray workers, the launch
waiting=""      # the child `await` waits for
launch_step=""  # the launch's srun step (its client's PID), once started
launch_pid_file="$tmp_root/ds3dist-$job_id.launch.pid"  # the launch's own PID (this node)
stop_by=0       # once a signal was passed on to the launch: when its step is ended

# Wait up to $1 seconds for the srun steps started here to end; false if some still run.
# shellcheck disable=SC2317,SC2329  # invoked by cleanup
steps_end_within() {
    local deadline=$(( SECONDS + $1 )) alive p
    while (( SECONDS < deadline )); do
        alive=0
        for p in "${step_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 1
    done
    return 1
}
# shellcheck disable=SC2317,SC2329  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n "$waiting" ]] && { kill -TERM "$waiting" 2>/dev/null || true; }
    if (( ${#step_pids[@]} )); then
        echo "ds3dist: stopping the Ray nodes started by this job (srun steps ${step_pids[*]})"
        # SIGTERM to every process of this job's steps (all started here; not this script):
        # `ray start --block` then shuts its node down cleanly. A SIGTERM to an srun client
        # instead makes srun SIGKILL its tasks: the fallback, then the last resort.
        timeout 20 scancel --signal=TERM "$job_id" 2>/dev/null ||
            kill -TERM "${step_pids[@]}" 2>/dev/null || true
        if ! steps_end_within 30; then
            kill -TERM "${step_pids[@]}" 2>/dev/null || true
            steps_end_within 40 || kill -KILL "${step_pids[@]}" 2>/dev/null || true
        fi
        wait "${step_pids[@]}" 2>/dev/null || true
    fi
    rm -f "$launch_pid_file"
    exit "$rc"
}
trap cleanup EXIT

# SIGTERM or SIGINT to this script (the time-limit warning, `scancel --batch`, Ctrl-C under
# salloc): before the launch runs, exit; once it runs, pass the signal on to it (a second one
# stops it at once) and give it $stop_s seconds to stop.
# shellcheck disable=SC2317,SC2329  # invoked by the traps below
on_signal() {
    [[ -n "$launch_step" ]] || exit $(( 128 + $(kill -l "$1") ))
    local pid
    pid=$(cat "$launch_pid_file" 2>/dev/null) || pid=""
    echo "ds3dist: SIG$1: passing it on to the launch"
    if [[ -n "$pid" ]]; then
        kill -s "$1" "$pid" 2>/dev/null || true
    else
        kill -TERM "$launch_step" 2>/dev/null || true  # not started yet: end its step
    fi
    (( stop_by )) || stop_by=$(( SECONDS + stop_s ))
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# Wait for child $1 and return its exit status. Unlike a foreground command, this lets the
# traps run at once. A launch still running $stop_s seconds after a signal: its step is ended.
await() {
    waiting=$1
    while kill -0 "$1" 2>/dev/null; do
        if (( stop_by && SECONDS >= stop_by )); then
            echo "ds3dist: the launch did not stop within $stop_s s; ending its step"
            kill -TERM "$1" 2>/dev/null || true  # srun then kills its task
            stop_by=0
        fi
        sleep 1 & wait $! || true
    done
    waiting=""
    wait "$1"  # its exit status, which bash kept
}

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
python - "$RAY_HEAD_ADDRESS" "$num_nodes" "$wait_s" <<'PY' &
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
await $!

# The launch: in an srun step on this node, so that `scancel --signal=TERM` reaches it too
# (--overlap, Slurm 20.11 or later: it shares the node's CPUs with the Ray head's step). It
# writes its PID for on_signal, which signals it directly: a SIGTERM to an srun client would
# make srun kill the step's tasks outright.
export RAY_ADDRESS="$RAY_HEAD_ADDRESS" LAUNCH_PID_FILE="$launch_pid_file"
rm -f "$launch_pid_file"
# shellcheck disable=SC2016
srun --overlap --nodes=1 --ntasks=1 --nodelist="$head_node" \
    bash -c 'echo $$ > "$LAUNCH_PID_FILE"; exec python -m ds3dist.launch "$@"' launch "$@" &
launch_step=$!
step_pids+=("$launch_step")
rc=0
await "$launch_step" || rc=$?
echo "ds3dist: launch exited with $rc"
exit "$rc"
