"""Stop cleanly when the scheduler asks: SIGTERM (preemption, scancel), SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal``) or SIGUSR2 (the same warning as submitit asks for it)
request a checkpoint at the next step boundary.

Ranks can receive the signal at different moments, so ``should_stop`` agrees on it with one tiny
all-reduce per step: every rank saves at the same step.

Schedulers signal every process of a job (``scancel``, preemption, ``kill -TERM -- -PGID``, torchrun's
shutdown), so the trainer's helper processes (loader workers, checkpoint writers) ignore these signals and
leave them to the trainer, and die with it instead (``ignore_stop_signals_and_die_with_parent``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

from engram_train.parallel import on_any_rank

#: Exit status after a preemption checkpoint (EX_TEMPFAIL: "try again"); launch/slurm.sbatch requeues on it.
REQUEUE_EXIT_CODE = 75

#: A file where the trainer records that it exits for requeue. torchrun exits 1 when it is itself signalled,
#: whatever its workers returned, so launch/torchrun.sh reads this to pass the workers' 75 on to the scheduler.
EXIT_CODE_FILE_ENV = "ENGRAM_EXIT_CODE_FILE"

#: What schedulers and launchers send to stop or warn a job; only the trainer acts on them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A helper that outlives a ``kill -9`` of its trainer keeps the trainer's sockets open (the peers then
    notice the death only after ``parallel.timeout_s``) and blocks forever on a pipe nobody reads.
    ``parent_pid``: exit at once if the parent died before the request was made.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def ignore_stop_signals_and_die_with_parent(parent_pid: int | None = None) -> None:
    """For a helper process: leave the stop signals to the trainer, and never outlive it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by ``stop_signals_blocked`` around the fork
    die_with_parent(parent_pid)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold the stop signals back while helper processes are started (they arrive afterwards).

    A child forked meanwhile inherits the mask, so a signal to the process group cannot kill it before it
    has set its own dispositions (``ignore_stop_signals_and_die_with_parent`` unblocks them).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)):
        self.requested: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has received a stop signal."""
        return on_any_rank(self.requested is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def hand_over(signal_name: str | None) -> None:
    """Once the checkpoint is written, run the Python handler that was installed for the signal before ours.

    submitit binds SIGUSR2 to a handler that requeues the job from rank 0 and exits. Left to itself it
    would act mid-step with no trainer checkpoint, so the steps since the last periodic one would be redone;
    the watch takes the signal first and passes it on here, after every rank has saved. Call it after
    ``PreemptionWatch.restore`` (the previous handlers are back in place). Default or ignored
    dispositions (plain torchrun, sbatch) have nothing to pass on.
    """
    if signal_name is None:
        return
    signum = signal.Signals[signal_name]
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


def record_requeue_exit() -> None:
    """Note in ``$ENGRAM_EXIT_CODE_FILE`` (when a launcher set it) that this process exits for requeue."""
    path = os.environ.get(EXIT_CODE_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{REQUEUE_EXIT_CODE}\n")
