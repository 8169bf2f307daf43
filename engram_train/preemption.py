"""Stop cleanly when the scheduler asks: SIGTERM (preemption, scancel) or SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal``) request a checkpoint at the next step boundary.

Ranks can receive the signal at different moments, so ``should_stop`` agrees on it with one tiny
all-reduce per step: every rank saves at the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

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
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
