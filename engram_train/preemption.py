"""Stop cleanly when the scheduler asks: SIGTERM (preemption, scancel) or SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal``) request a checkpoint at the next step boundary.

Ranks can receive the signal at different moments, so ``should_stop`` agrees on it with one tiny
all-reduce per step: every rank saves at the same step.
"""

from __future__ import annotations

import signal

from engram_train.parallel import on_any_rank

#: Exit status after a preemption checkpoint (EX_TEMPFAIL: "try again"); launch/slurm.sbatch requeues on it.
REQUEUE_EXIT_CODE = 75


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
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
