"""Lazy (sparse) optimizers for the rows a rank owns.

Only rows that received a gradient are read or written, and a row gets optimizer state the first
time it is touched: a slot map (``local row -> state slot``, -1 = never touched) points into state
buffers that grow on demand. Untouched rows therefore cost 4 bytes (the slot) instead of their full
optimizer state, which is what makes a 100M-row table fit next to its moments.

Each step gathers the touched rows, their grads and their state into contiguous fp32 buffers, runs
the update there (DeepSpeed's vectorised CPU Adam kernel, or torch), and scatters the results back.
Row storage may be bf16; the update always runs on fp32 copies and the result is rounded back to
bf16, so small updates (below bf16's ~3 significant digits of the row value) are lost, exactly as
with any bf16 parameter without fp32 master weights.

Adam follows ``torch.optim.SparseAdam``: moments of touched rows decay, untouched rows keep theirs,
and bias correction uses the table's global step count. No weight decay (paper, DESIGN.md 3).
"""

from __future__ import annotations

import math
import threading
import warnings

import torch

OPTIMIZERS = ("adam", "rowwise_adam", "rowwise_adagrad")
TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SparseRowOptimizer:
    """Base: slot map, growing state buffers, gather -> update -> scatter."""

    name = ""

    def __init__(self, num_local_rows: int, dim: int, betas: tuple[float, float], eps: float):
        self.dim = dim
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        # int32 slots halve the per-row cost of untouched rows; int64 only past 2**31 local rows.
        slot_dtype = torch.int32 if num_local_rows < 2**31 - 1 else torch.int64
        self.slot = torch.full((num_local_rows,), -1, dtype=slot_dtype)
        self.num_slots = 0
        self.state = {k: torch.zeros((0, *shape)) for k, shape in self.state_shapes(dim).items()}

    @staticmethod
    def state_shapes(dim: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def state_bytes_per_row(cls, dim: int) -> int:
        return sum(4 * math.prod(shape) for shape in cls.state_shapes(dim).values())

    def bytes_allocated(self) -> int:
        return self.slot.numel() * self.slot.element_size() + sum(t.numel() * 4 for t in self.state.values())

    # -- slots -----------------------------------------------------------------------------------
    def _slots(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Slots of the (unique) ``local_ids``, creating zero state for rows touched the first time."""
        slots = self.slot.index_select(0, local_ids).long()
        new = slots < 0
        n_new = int(new.sum())
        if n_new:
            fresh = torch.arange(self.num_slots, self.num_slots + n_new, dtype=torch.long)
            slots[new] = fresh
            self.slot.index_copy_(0, local_ids[new], fresh.to(self.slot.dtype))
            self._grow(self.num_slots + n_new)
            for t in self.state.values():
                t[self.num_slots : self.num_slots + n_new].zero_()
            self.num_slots += n_new
        return slots

    def _grow(self, needed: int) -> None:
        cap = next(iter(self.state.values())).shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 1024)
        for k, t in self.state.items():
            grown = torch.empty((new_cap, *t.shape[1:]))
            grown[: self.num_slots] = t[: self.num_slots]
            self.state[k] = grown

    # -- update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, rows: torch.Tensor, local_ids: torch.Tensor, grads: torch.Tensor, lr: float, step: int) -> None:
        """Apply one step to ``rows[local_ids]`` (unique ids) given their fp32 ``grads``."""
        if local_ids.numel() == 0:
            return
        slots = self._slots(local_ids)
        params = rows.index_select(0, local_ids).float().contiguous()
        states = {k: t.index_select(0, slots) for k, t in self.state.items()}
        self._apply(params, grads.contiguous(), states, lr, step)
        rows.index_copy_(0, local_ids, params.to(rows.dtype))
        for k, t in self.state.items():
            t.index_copy_(0, slots, states[k])

    def _apply(self, p: torch.Tensor, g: torch.Tensor, s: dict[str, torch.Tensor], lr: float, step: int) -> None:
        raise NotImplementedError

    def _adam_step_size(self, lr: float, step: int) -> float:
        """SparseAdam's bias-corrected step size, in double precision from the global step alone."""
        b1, b2 = self.betas
        return lr * math.sqrt(1 - b2**step) / (1 - b1**step)

    # -- checkpoint ------------------------------------------------------------------------------
    def export_state(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(touched local row ids ascending, state rows in that order) — never-touched rows omitted."""
        touched = (self.slot >= 0).nonzero().flatten()
        slots = self.slot.index_select(0, touched).long()
        return touched, {k: t.index_select(0, slots) for k, t in self.state.items()}

    def import_state(self, local_ids: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Replace all state by ``state`` rows for ``local_ids`` (unique)."""
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state has {sorted(state)}, {self.name} needs {sorted(self.state)}")
        self.slot.fill_(-1)
        self.num_slots = 0
        self.state = {k: torch.zeros((0, *t.shape[1:])) for k, t in self.state.items()}
        slots = self._slots(local_ids.long())
        for k, t in self.state.items():
            t.index_copy_(0, slots, state[k].float())


class TorchAdam(SparseRowOptimizer):
    """SparseAdam's arithmetic on gathered rows (the reference path)."""

    name = "adam"

    @staticmethod
    def state_shapes(dim: int) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,)}

    def _apply(self, p, g, s, lr, step):
        b1, b2 = self.betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = self._adam_step_size(lr, step)
        p.addcdiv_(m, v.sqrt().add_(self.eps), value=-step_size)


class CpuAdam(TorchAdam):
    """Adam through DeepSpeed's vectorised CPU kernel (``cpu_adam`` op, JIT-built once and cached).

    The kernel runs with its bias correction off and is given SparseAdam's corrected step size
    ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (computed here in double precision) with the plain ``eps``:
    that is SparseAdam's update, ``p -= step_size * m / (sqrt(v) + eps)``. Its own bias correction
    would also differ in form (it divides by ``sqrt(v) / sqrt(1 - b2^t) + eps``) and, worse, keeps
    ``b^t`` as a running float product inside the C++ object: a resumed run recomputes it with
    ``pow`` and rounds differently, so the table would no longer continue the same curve bit for bit.
    """

    _op = None
    _load_error: Exception | None = None  # a failed build is not retried by every table of this process
    _next_id = 10_000  # away from DeepSpeedCPUAdam's own ids (they count from 0)
    _lock = threading.Lock()

    def __init__(self, num_local_rows, dim, betas, eps):
        super().__init__(num_local_rows, dim, betas, eps)
        op = self.load_op()
        with CpuAdam._lock:
            self._id = CpuAdam._next_id
            CpuAdam._next_id += 1
        op.create_adam(self._id, 1e-3, self.betas[0], self.betas[1], self.eps, 0.0, True, False)

    @classmethod
    def load_op(cls):
        """Load (building on first use, ~45 s; cached in TORCH_EXTENSIONS_DIR) the cpu_adam op. A failure is kept
        and raised again: a build that fails late (a compiler error after tens of seconds) costs that once a
        process, not once for every table a process builds."""
        with cls._lock:
            if cls._load_error is not None:
                raise cls._load_error
            if cls._op is None:
                try:
                    from deepspeed.ops.op_builder import CPUAdamBuilder

                    cls._op = CPUAdamBuilder().load(verbose=False)
                except Exception as error:
                    cls._load_error = error
                    raise
        return cls._op

    def _apply(self, p, g, s, lr, step):
        b1, b2 = self.betas
        self._op.adam_update(self._id, step, self._adam_step_size(lr, step), b1, b2, self.eps, 0.0, False,
                             p, g, s["exp_avg"], s["exp_avg_sq"])

    def __del__(self):
        if CpuAdam._op is not None and hasattr(self, "_id"):
            CpuAdam._op.destroy_adam(self._id)


class RowwiseAdam(SparseRowOptimizer):
    """Adam with a per-element first moment and one second-moment scalar per row (mean of g^2)."""

    name = "rowwise_adam"

    @staticmethod
    def state_shapes(dim: int) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": (dim,), "exp_avg_sq": ()}

    def _apply(self, p, g, s, lr, step):
        b1, b2 = self.betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).add_(g.square().mean(dim=1), alpha=1 - b2)
        step_size = self._adam_step_size(lr, step)
        p.addcdiv_(m, v.sqrt().add_(self.eps).unsqueeze(1), value=-step_size)


class RowwiseAdagrad(SparseRowOptimizer):
    """Adagrad with one accumulated mean(g^2) scalar per row (FBGEMM's row-wise Adagrad)."""

    name = "rowwise_adagrad"

    @staticmethod
    def state_shapes(dim: int) -> dict[str, tuple[int, ...]]:
        return {"sum_sq": ()}

    def _apply(self, p, g, s, lr, step):
        v = s["sum_sq"]
        v.add_(g.square().mean(dim=1))
        p.addcdiv_(g, v.sqrt().add_(self.eps).unsqueeze(1), value=-lr)


def build_optimizer(
    name: str, num_local_rows: int, dim: int, betas: tuple[float, float], eps: float, use_cpu_adam: bool
) -> SparseRowOptimizer:
    """``engram.optimizer`` -> optimizer; ``adam`` uses DeepSpeed's kernel when asked and loadable."""
    if name not in OPTIMIZERS:
        raise ValueError(f"engram.optimizer={name!r} is invalid: choose one of {', '.join(OPTIMIZERS)}")
    if name == "rowwise_adam":
        return RowwiseAdam(num_local_rows, dim, betas, eps)
    if name == "rowwise_adagrad":
        return RowwiseAdagrad(num_local_rows, dim, betas, eps)
    if use_cpu_adam:
        try:
            return CpuAdam(num_local_rows, dim, betas, eps)
        except Exception as exc:  # no compiler / DeepSpeed build failure: same maths in torch
            warnings.warn(f"DeepSpeed cpu_adam unavailable ({exc}); the Engram table uses torch Adam", stacklevel=2)
    return TorchAdam(num_local_rows, dim, betas, eps)


def bytes_per_row(optimizer: str, table_dtype: str, dim: int) -> int:
    """Host bytes one row costs once touched: row storage + optimizer state + its 4-byte slot."""
    cls = {"adam": TorchAdam, "rowwise_adam": RowwiseAdam, "rowwise_adagrad": RowwiseAdagrad}[optimizer]
    row = dim * torch.empty((), dtype=TABLE_DTYPES[table_dtype]).element_size()
    return row + cls.state_bytes_per_row(dim) + 4
