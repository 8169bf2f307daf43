#!/usr/bin/env bash
# A real one-node SLURM (slurmctld + slurmd + a private munged) on this machine, for trying
# launch/slurm.sbatch and for tests/integration/test_slurm.py.
#
#   launch/local_slurm.sh start     # install if missing (apt), write config, start the daemons
#   launch/local_slurm.sh status    # daemons alive? sinfo
#   launch/local_slurm.sh stop      # stop only the daemons this script started (by their PID files)
#   export SLURM_CONF=<dir>/slurm.conf   # printed by start; then sbatch/srun/squeue/scontrol talk to it
#
# Environment: LOCAL_SLURM_DIR (config, state, logs, PID files; default /tmp/engram-local-slurm),
# LOCAL_SLURM_PORT (slurmctld port; slurmd uses the next one; default 6817).
# Limits of the cluster it makes: one node, this machine's CPUs, RealMemory=1000 MB (jobs may ask
# --mem <= 1000), no GPUs, no accounting database (finished jobs: `scontrol show job` for an hour,
# and <dir>/jobcomp.log). Must run as root: SlurmUser is root and munged runs as the munge user.
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/engram-local-slurm}"
PORT="${LOCAL_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
# munged runs as the munge user, which may not reach into DIR (e.g. a 0700 temp dir), and a socket path
# must stay short: its files live in a short per-DIR folder under /run instead.
MUNGE_DIR="/run/engram-munge/$(printf %s "$DIR" | md5sum | cut -c1-12)"
SOCKET="$MUNGE_DIR/munge.socket"
PACKAGES=(slurmctld slurmd slurm-client munge)
# daemon name -> PID file; stopped in this order
DAEMONS=(slurmd slurmctld munged)

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit "${2:-1}"; }

pidfile() {
    case "$1" in
        munged) echo "$MUNGE_DIR/munged.pid" ;;
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

# PID of a daemon this script started, if it is still that daemon (guards against PID reuse).
live_pid() {
    local file pid
    file="$(pidfile "$1")"
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc 0-9 <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$1" ]] || return 1
    echo "$pid"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is unavailable; install ${PACKAGES[*]}" 3
    [[ $(id -u) == 0 ]] || die "installing ${PACKAGES[*]} needs root (sudo $0 start)" 3
    say "installing ${PACKAGES[*]} (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}"; } >"${TMPDIR:-/tmp}/local_slurm_apt.log" 2>&1 \
        || die "apt-get install ${PACKAGES[*]} failed; see ${TMPDIR:-/tmp}/local_slurm_apt.log" 3
}

write_config() {
    local host cpus
    host="$(hostname -s)"
    cpus="$(nproc)"
    mkdir -p "$DIR"/{run,state,spool,log} "$MUNGE_DIR"
    chmod 0755 /run/engram-munge
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    cat >"$CONF" <<CONF
# Written by launch/local_slurm.sh: a one-node cluster for development and tests.
ClusterName=engram-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munged() {
    live_pid munged >/dev/null && return 0
    rm -f "$SOCKET" "$SOCKET.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --pid-file="$(pidfile munged)" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" --key-file=/etc/munge/munge.key \
        || die "munged did not start; see $MUNGE_DIR/munged.log"
    for _ in $(seq 50); do
        munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but 'munge -n | unmunge' fails; see $MUNGE_DIR/munged.log"
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root: SlurmUser is root and munged must run as the munge user" 3
    install_packages
    if live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null; then
        say "already running"
        print_env
        return 0
    fi
    write_config
    start_munged
    export SLURM_CONF="$CONF"
    live_pid slurmctld >/dev/null || slurmctld -i -f "$CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    live_pid slurmd >/dev/null || slurmd -f "$CONF" || die "slurmd failed; see $DIR/log/slurmd.log"
    local state=""
    for _ in $(seq 100); do
        state="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
        [[ "$state" == idle ]] && break
        sleep 0.2
    done
    [[ "$state" == idle ]] || die "node is '${state:-unreachable}' after 20 s; see $DIR/log/slurmctld.log and slurmd.log"
    say "started in $DIR (slurmctld port $PORT)"
    print_env
}

stop() {
    local name pid stopped=0
    for name in "${DAEMONS[@]}"; do
        if pid="$(live_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do
                [[ -d "/proc/$pid" ]] || break
                sleep 0.1
            done
            [[ -d "/proc/$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
            say "stopped $name (pid $pid)"
            stopped=1
        fi
        rm -f "$(pidfile "$name")"
    done
    # The munge folder is ours alone (named after DIR); the state dir stays for its logs.
    [[ -d "$MUNGE_DIR" ]] && ! live_pid munged >/dev/null && rm -rf "$MUNGE_DIR"
    ((stopped)) || say "nothing of ours was running (state in $DIR)"
}

status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid="$(live_pid "$name")"; then echo "$name running (pid $pid)"; else echo "$name not running"; rc=1; fi
    done
    if ((rc == 0)); then SLURM_CONF="$CONF" sinfo; fi
    echo "state dir: $DIR (munge: $MUNGE_DIR)"
    return $rc
}

print_env() {
    echo "state dir: $DIR"
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (LOCAL_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
