#!/usr/bin/env bash
# Launch engram_train.train under torchrun, on one node or as one node of a multi-node job.
#
#   launch/torchrun.sh [options] [--] [hydra overrides ...]
#
#   launch/torchrun.sh --nproc-per-node 2 parallel.ep=2                       # single node (--standalone)
#   launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --master node01:29500 \
#       --node-rank 0 parallel.tp=2 parallel.ep=4                              # run on every node
#
# Options (each has an environment variable of the same meaning, which the option overrides):
#   --nproc-per-node N   NPROC_PER_NODE  processes on this node (default: GPU count, else 1)
#   --nnodes N           NNODES          nodes (default 1); one node without --master runs --standalone,
#                                        otherwise the nodes meet at a rendezvous on --master
#   --node-rank R        NODE_RANK       this node's rank; only the static backend uses it, c10d orders
#                                        nodes as they join (default 0)
#   --master HOST[:PORT] MASTER_ADDR/MASTER_PORT  rendezvous endpoint, a host every node can reach
#                                        (default port 29500)
#   --rdzv-id ID         RDZV_ID         rendezvous id, the same on every node (default: SLURM_JOB_ID or "engram")
#   --rdzv-backend B     RDZV_BACKEND    c10d (default) or static
#   --max-restarts K     MAX_RESTARTS    torchrun restarts all workers up to K times after a failure
#                                        (default 0); each restart auto-resumes from the newest checkpoint
#   --shutdown-timeout S SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to exit after forwarding a signal,
#                                        before SIGKILL (default 100: inside the sbatch's 120 s warning, time
#                                        for the trainer's preemption checkpoint)
# Everything else (or everything after --) goes to the trainer: Hydra overrides and flags.
#
# Defaults set here when unset: TORCH_EXTENSIONS_DIR=<repo>/.cache/torch_extensions (DeepSpeed's JIT
# kernels, built once and shared), WANDB_MODE=offline. A trainer checkpoints at the next step boundary and
# exits on SIGUSR1 or SIGTERM (engram_train/preemption.py): outside SLURM, send USR1 to the trainer processes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NPROC_PER_NODE="${NPROC_PER_NODE:-}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-engram}}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-100}"
# Signals torchrun catches and forwards to its workers' process groups. Not USR1: under SLURM every process
# of the step gets it directly, and launch/slurm.sbatch starts the step with USR1 ignored so that only the
# trainer's main process (which installs a handler) reacts to it.
SIGNALS_TO_HANDLE="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT}"

overrides=()
while (($#)); do
    case "$1" in
        --nproc-per-node|--nproc_per_node) NPROC_PER_NODE="${2:?$1 needs a value}"; shift 2 ;;
        --nnodes) NNODES="${2:?$1 needs a value}"; shift 2 ;;
        --node-rank|--node_rank) NODE_RANK="${2:?$1 needs a value}"; shift 2 ;;
        --master) MASTER_ADDR="${2:?$1 needs a value}"; shift 2 ;;
        --rdzv-id) RDZV_ID="${2:?$1 needs a value}"; shift 2 ;;
        --rdzv-backend) RDZV_BACKEND="${2:?$1 needs a value}"; shift 2 ;;
        --max-restarts) MAX_RESTARTS="${2:?$1 needs a value}"; shift 2 ;;
        --shutdown-timeout) SHUTDOWN_TIMEOUT="${2:?$1 needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        *) overrides+=("$1"); shift ;;
    esac
done

if [[ "$MASTER_ADDR" == *:* ]]; then
    MASTER_PORT="${MASTER_ADDR##*:}"
    MASTER_ADDR="${MASTER_ADDR%:*}"
fi
if [[ -z "$NPROC_PER_NODE" ]]; then
    NPROC_PER_NODE="$(gpu_count)"
    ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
fi
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$NPROC_PER_NODE'"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--nnodes must be N or MIN:MAX, got '$NNODES'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"
[[ "$SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]] || die "--shutdown-timeout must be seconds, got '$SHUTDOWN_TIMEOUT'"

# The interpreter of the repo's venv when there is one, so `make setup` is enough to launch.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$TORCH_EXTENSIONS_DIR"

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS"
     --signals-to-handle "$SIGNALS_TO_HANDLE" --shutdown-timeout "$SHUTDOWN_TIMEOUT")
if [[ "$NNODES" == 1 && -z "$MASTER_ADDR" ]]; then
    cmd+=(--standalone)
else
    [[ -n "$MASTER_ADDR" ]] || die "--nnodes $NNODES needs --master HOST[:PORT] (or MASTER_ADDR): a host every node can reach, usually the first node"
    cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend "$RDZV_BACKEND" --rdzv-id "$RDZV_ID"
          --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
    if [[ "$RDZV_BACKEND" == static ]]; then
        cmd+=(--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    fi
fi
cmd+=(-m engram_train.train "${overrides[@]}")

echo "+ ${cmd[*]}" >&2
# The scheduler's signals are passed to torchrun, which forwards them to every worker. A signalled torchrun
# exits 1 whatever its workers returned, so the trainers note a requeue exit (75) in a file and we return that.
export ENGRAM_EXIT_CODE_FILE
ENGRAM_EXIT_CODE_FILE="$(mktemp "${TMPDIR:-/tmp}/engram-exit.XXXXXX")"
trap 'rm -f "$ENGRAM_EXIT_CODE_FILE"' EXIT
"${cmd[@]}" &
torchrun_pid=$!
for sig in TERM INT HUP QUIT; do trap "kill -$sig $torchrun_pid 2>/dev/null" "$sig"; done
while :; do
    status=0
    wait "$torchrun_pid" || status=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break  # wait returned for a trapped signal: torchrun still runs
done
if ((status != 0)) && [[ "$(cat "$ENGRAM_EXIT_CODE_FILE")" == 75 ]]; then
    echo "launch/torchrun.sh: the trainers checkpointed and exited for requeue; exiting 75 (torchrun said $status)" >&2
    exit 75
fi
exit "$status"
