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
#   --nproc-per-node N   NPROC_PER_NODE  processes on this node (default: --gpus, else the GPU count, else 1)
#   --nnodes N           NNODES          nodes (default 1); one node without --master runs --standalone,
#                                        otherwise the nodes meet at a rendezvous on --master
#   --node-rank R        NODE_RANK       this node's rank; only the static backend uses it for rank order, c10d
#                                        orders nodes as they join; with c10d, node 0 hosts the rendezvous store
#                                        when --master is one of its own addresses (default 0)
#   --master HOST[:PORT] MASTER_ADDR/MASTER_PORT  rendezvous endpoint, a host every node can reach
#                                        (default port 29500)
#   --rdzv-id ID         RDZV_ID         rendezvous id, the same on every node (default: SLURM_JOB_ID or "engram")
#   --rdzv-backend B     RDZV_BACKEND    c10d (default) or static
#   --max-restarts K     MAX_RESTARTS    torchrun restarts all workers up to K times after a failure
#                                        (default 0); each restart auto-resumes from the newest checkpoint
#   --shutdown-timeout S SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to exit after forwarding a signal,
#                                        before SIGKILL (default 100: inside the sbatch's 120 s warning, time
#                                        for the trainer's preemption checkpoint)
#   --ifname IF          ENGRAM_IFNAME   network interface the ranks talk over: sets GLOO_SOCKET_IFNAME (the
#                                        Engram table's traffic, and the backbone's on CPU) and
#                                        NCCL_SOCKET_IFNAME, and advertises IF's IPv4 address to the other
#                                        nodes (--local-addr). Unset (default): both variables pass through as
#                                        set, or stay unset and the libraries choose
#   --local-addr ADDR    LOCAL_ADDR      address the other nodes reach this node at (default: --ifname's
#                                        address, else torch's guess from the host name)
#   --log-dir DIR        LOG_DIR         per-rank logs go to DIR/node<R>-<host>/<rdzv id>_*/attempt_<k>/<local
#                                        rank>/{stdout,stderr}.log (default <repo>/outputs/logs/torchrun/<rdzv id>)
#   --console-ranks L    CONSOLE_RANKS   local ranks also shown on this console, e.g. 0,1, or "all" (default 0);
#                                        lines are prefixed [default<local rank>]:
#   --gpus N             ENGRAM_GPUS_PER_NODE  GPUs this node must have: refuse to start (exit 2) when torch sees
#                                        fewer, instead of training on CPU (default: unset, no check)
#   --print-extensions-dir               print the TORCH_EXTENSIONS_DIR this script uses, and exit
# Everything else (or everything after --) goes to the trainer: Hydra overrides and flags.
#
# Defaults set here when unset: OMP_NUM_THREADS=<CPUs available here> / <processes per node> (at least 1);
# TORCH_EXTENSIONS_DIR=<repo>/.cache/torch_extensions/<arch>-<gcc -march=native>-<hash of the CPU model and
# flags> (DeepSpeed's JIT kernels are built with -march=native: a node of another CPU model builds its own
# instead of loading one that may die of SIGILL); WANDB_MODE=offline. Each trainer gets SIGKILL when this
# node's torchrun dies (PR_SET_PDEATHSIG), so a killed launcher leaves no rank behind holding the job's
# sockets: its peers on the other nodes fail at their next collective. A trainer checkpoints at the next step
# boundary and exits on SIGUSR1 or SIGTERM (engram_train/preemption.py): outside SLURM, send USR1 to the
# trainer processes.
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

# Names this machine's CPU for the kernel cache: DeepSpeed compiles with -march=native, so a kernel is valid
# only on CPUs with the same instruction set. <arch>-<what gcc resolves -march=native to>-<hash of the CPU
# model and feature flags> (the resolved name alone can hide differences, e.g. AVX-512 turned off in a VM).
cpu_key() {
    local march hash
    # (awk reads all its input: an early exit would fail the pipe under pipefail)
    march="$(gcc -march=native -Q --help=target 2>/dev/null | awk '$1 == "-march=" && !m { m = $2 } END { print m }' || true)"
    hash="$({ grep -m 2 -E '^(model name|cpu model|flags|Features|CPU part)[[:space:]]*:' /proc/cpuinfo 2>/dev/null || true; } \
            | md5sum | cut -c1-10)"
    echo "$(uname -m)-${march:-unknown}-$hash"
}
extensions_dir() { echo "${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions/$(cpu_key)}"; }

# This host's addresses (all interfaces but loopback), one per line.
local_addresses() {
    if command -v ip >/dev/null 2>&1; then
        ip -o addr show 2>/dev/null | awk '{ sub(/\/.*/, "", $4); print $4 }'
    else
        hostname -I 2>/dev/null | tr ' ' '\n'
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
IFNAME="${ENGRAM_IFNAME:-}"
LOCAL_ADDR="${LOCAL_ADDR:-}"
LOG_DIR="${LOG_DIR:-}"
CONSOLE_RANKS="${CONSOLE_RANKS:-0}"
GPUS="${ENGRAM_GPUS_PER_NODE:-}"
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
        --ifname) IFNAME="${2:?$1 needs a value}"; shift 2 ;;
        --local-addr) LOCAL_ADDR="${2:?$1 needs a value}"; shift 2 ;;
        --log-dir) LOG_DIR="${2:?$1 needs a value}"; shift 2 ;;
        --console-ranks) CONSOLE_RANKS="${2:?$1 needs a value}"; shift 2 ;;
        --gpus) GPUS="${2:?$1 needs a value}"; shift 2 ;;
        --print-extensions-dir) extensions_dir; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        *) overrides+=("$1"); shift ;;
    esac
done

if [[ "$MASTER_ADDR" == *:* ]]; then
    MASTER_PORT="${MASTER_ADDR##*:}"
    MASTER_ADDR="${MASTER_ADDR%:*}"
fi
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus (ENGRAM_GPUS_PER_NODE) must be a GPU count, got '$GPUS'"
if [[ -z "$NPROC_PER_NODE" ]]; then
    if [[ -n "$GPUS" && "$GPUS" != 0 ]]; then NPROC_PER_NODE="$GPUS"; else NPROC_PER_NODE="$(gpu_count)"; fi
    ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
fi
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$NPROC_PER_NODE'"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--nnodes must be N or MIN:MAX, got '$NNODES'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"
[[ "$SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]] || die "--shutdown-timeout must be seconds, got '$SHUTDOWN_TIMEOUT'"
[[ "$CONSOLE_RANKS" == all || "$CONSOLE_RANKS" =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die "--console-ranks must be local ranks like 0 or 0,1, or all; got '$CONSOLE_RANKS'"

# The interpreter of the repo's venv when there is one, so `make setup` is enough to launch.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

export TORCH_EXTENSIONS_DIR
TORCH_EXTENSIONS_DIR="$(extensions_dir)"
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$TORCH_EXTENSIONS_DIR"

# Threads per rank: the CPUs this process may use (its affinity: a SLURM task's CPUs, a container's cpuset),
# shared among the node's ranks. torchrun would otherwise set 1 for several ranks, or leave each rank all cores.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    OMP_NUM_THREADS=$((cores / NPROC_PER_NODE))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

if [[ -n "$IFNAME" ]]; then
    [[ -e "/sys/class/net/$IFNAME" ]] || die "--ifname $IFNAME: no such network interface here (interfaces: $(ls /sys/class/net 2>/dev/null | tr '\n' ' '))"
    export GLOO_SOCKET_IFNAME="$IFNAME" NCCL_SOCKET_IFNAME="$IFNAME"
    if [[ -z "$LOCAL_ADDR" ]] && command -v ip >/dev/null 2>&1; then
        LOCAL_ADDR="$(ip -o -4 addr show dev "$IFNAME" 2>/dev/null | awk '!a { a = $4; sub(/\/.*/, "", a) } END { print a }' || true)"
    fi
fi

if [[ -n "$GPUS" && "$GPUS" != 0 ]]; then
    # Asked for GPUs: never fall back to CPU silently (a CPU-only torch, a node without drivers, a job that
    # requested none). The trainers see ENGRAM_GPUS_PER_NODE too.
    export ENGRAM_GPUS_PER_NODE="$GPUS"
    # Megatron's sequence-parallel all-gather/reduce-scatter overlap relies on one hardware queue per device, so the
    # collectives it launches first run first (megatron-core tensor_parallel/layers.py checks it).
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    seen="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
    ((seen >= GPUS && seen >= NPROC_PER_NODE)) \
        || die "asked for $GPUS GPU(s) per node and $NPROC_PER_NODE rank(s) here, but torch sees $seen GPU(s) on $(hostname)" \
               "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}; $("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "torch does not import")):" \
               "refusing to train on CPU. Request GPUs from the scheduler (sbatch --gpus-per-node=$GPUS) or drop --gpus/ENGRAM_GPUS_PER_NODE"
fi

# One log per rank (stdout and stderr, every local rank, every restart attempt) under this node's folder;
# the console shows CONSOLE_RANKS only.
LOG_DIR="${LOG_DIR:-$REPO/outputs/logs/torchrun/$RDZV_ID}"
NODE_LOG_DIR="$LOG_DIR/node$NODE_RANK-$(hostname -s 2>/dev/null || hostname)"
mkdir -p "$NODE_LOG_DIR"

# Each worker asks the kernel for SIGKILL when torchrun (the thread that started it) dies (prctl 1 is
# PR_SET_PDEATHSIG; exit at once if torchrun is already gone), then becomes the trainer, unbuffered as torchrun
# would start it (exec keeps the setting): a torchrun killed with -9 or by the OOM killer takes its ranks with it
# instead of leaving them to train on, or hang, with the job's other nodes. (The code opens with an expression
# starting with '-' because torchrun names the workers after their first argument not starting with '-' in its
# failure reports: engram_train.train, as without this wrapper.)
die_with_torchrun='-0; import ctypes, os, signal, sys; parent = os.getppid(); ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); os.getppid() == parent or os._exit(1); os.execv(sys.executable, [sys.executable, "-u", *sys.argv[1:]])'

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS"
     --signals-to-handle "$SIGNALS_TO_HANDLE" --shutdown-timeout "$SHUTDOWN_TIMEOUT"
     --log-dir "$NODE_LOG_DIR" --redirects 3 --tee 3)
[[ "$CONSOLE_RANKS" == all ]] || cmd+=(--local-ranks-filter "$CONSOLE_RANKS")
if [[ "$NNODES" == 1 && -z "$MASTER_ADDR" ]]; then
    cmd+=(--standalone)
else
    [[ -n "$MASTER_ADDR" ]] || die "--nnodes $NNODES needs --master HOST[:PORT] (or MASTER_ADDR): a host every node can reach, usually the first node"
    cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend "$RDZV_BACKEND" --rdzv-id "$RDZV_ID"
          --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
    [[ -n "$LOCAL_ADDR" ]] && cmd+=(--local-addr "$LOCAL_ADDR")
    if [[ "$RDZV_BACKEND" == static ]]; then
        cmd+=(--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    elif [[ "$NODE_RANK" == 0 ]] && { [[ "$MASTER_ADDR" == "$LOCAL_ADDR" ]] || grep -qxF "$MASTER_ADDR" <<<"$(local_addresses || true)"; }; then
        # torch recognises its own host only by the host name's addresses; an address of another interface
        # (a fabric NIC, a private network) would leave every node waiting for a store nobody hosts.
        cmd+=(--rdzv-conf is_host=1)
    fi
fi
cmd+=(--no-python "$PYTHON" -c "$die_with_torchrun" -m engram_train.train "${overrides[@]}")

echo "+ ${cmd[*]}" >&2
echo "launch/torchrun.sh: OMP_NUM_THREADS=$OMP_NUM_THREADS GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME-} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME-}" \
     "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR; per-rank logs under $NODE_LOG_DIR" >&2
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
((status == 0)) || echo "launch/torchrun.sh: torchrun exited with $status; every rank's output is under $NODE_LOG_DIR" >&2
exit "$status"
