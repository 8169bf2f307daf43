"""Stop cleanly when the scheduler asks: SIGTERM (preemption, scancel), SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal``) or SIGUSR2 (the same warning as submitit asks for it)
request a checkpoint at the next step boundary.

Ranks can receive the signal at different moments, so ``should_stop`` agrees on it with one tiny
all-reduce per step: every rank saves at the same step.
"""

from __future__ import annotations

import signal

from engram_train.parallel import on_any_rank

#: Exit status after a preemption checkpoint (EX_TEMPFAIL: "try again"); launch/slurm.sbatch requeues on it.
REQUEUE_EXIT_CODE = 75


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
