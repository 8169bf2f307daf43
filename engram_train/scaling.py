"""Parameter accounting and the allocation-ratio planner (the paper's sparsity-allocation experiment).

Definitions follow the Engram paper (DESIGN.md section 7):
  P_tot    all trainable parameters except the vocabulary embedding and the LM head (Engram rows included);
  P_act    parameters one token passes through: attention, norms, routers, the top-k routed experts, the
           shared expert, the Engram blocks' projections/norms/conv and the one row per head it looks up;
  P_sparse P_tot - P_act: the inactive routed experts plus the Engram rows a token does not read;
  rho      share of P_sparse held by routed experts (1: pure MoE, 0: every sparse parameter is memory).

The planner fixes P_tot and P_act from a pure-MoE reference (the backbone preset with
``scaling.reference_experts`` routed experts) or from explicit targets, and for a requested rho picks the
routed-expert count and Engram rows per head. The Engram block's dense parameters and the router's change
with the expert count are activated parameters; they are paid for by the shared expert's width, so P_act
stays fixed to within one shared-expert column (3 x hidden x MoE layers parameters) across rho.
Integers (expert count, prime table sizes, shared width) make the realised rho differ from the requested
one; both are reported.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np

from engram_train.config import Config, ConfigError
from engram_train.engram import NgramHasher


@dataclass(frozen=True)
class Accounting:
    """Parameter counts of one configuration, in the paper's terms."""

    total: int  # P_tot
    activated: int  # P_act
    expert_sparse: int  # routed experts a token does not use
    engram_sparse: int  # Engram rows a token does not read
    engram_rows: int
    routed_experts: int

    @property
    def sparse(self) -> int:
        return self.total - self.activated

    @property
    def allocation_ratio(self) -> float:
        """rho: the routed experts' share of the sparse parameters (1.0 for a model without sparse ones)."""
        return self.expert_sparse / self.sparse if self.sparse else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse": self.sparse, "allocation_ratio": self.allocation_ratio}


def table_head_sizes(engram_cfg) -> np.ndarray:
    """The hasher's own prime head sizes; they depend on the config only, not on the vocabulary."""
    return NgramHasher.from_config(engram_cfg, np.zeros(1, dtype=np.int64), pad_token_id=0).head_sizes


def _moe_layers(cfg: Config) -> int:
    m = cfg.model
    if not m.num_experts:
        return 0
    return sum(1 for layer in range(m.num_layers) if layer % m.moe_layer_freq == 0)


def engram_block_parameters(cfg: Config) -> int:
    """Dense parameters of the Engram blocks (key/value projections, three RMSNorms, conv kernel)."""
    e, hidden = cfg.engram, cfg.model.hidden_size
    if not e.enabled:
        return 0
    memory_dim = len(e.ngram_orders) * e.heads_per_order * e.head_dim
    projections = 2 * (memory_dim * hidden + (hidden if e.projection_bias else 0))
    return len(e.layers) * (projections + 3 * hidden + e.conv_kernel_size * hidden)


def count_parameters(cfg: Config) -> Accounting:
    """Analytic counts of the model ``build_model`` and the table ``build_table`` make from ``cfg``.

    Megatron's GPT layer with the local spec: RMSNorm before attention and MLP (weight only), fused QKV
    and output projection without biases, SwiGLU FFNs (3 x hidden x width), a router of experts x hidden,
    a final norm. tests/unit/test_scaling.py checks these against a built model.
    """
    m = cfg.model
    hidden = m.hidden_size
    per_layer = 2 * hidden + 4 * hidden * hidden  # two norms, QKV + output projection
    moe_layers = _moe_layers(cfg)
    dense_layers = m.num_layers - moe_layers
    expert = 3 * hidden * m.moe_ffn_hidden_size
    moe_dense = hidden * m.num_experts + 3 * hidden * m.moe_shared_expert_intermediate_size
    activated = m.num_layers * per_layer + hidden  # + final norm
    activated += dense_layers * 3 * hidden * m.ffn_hidden_size
    activated += moe_layers * (moe_dense + m.moe_router_topk * expert)
    expert_sparse = moe_layers * (m.num_experts - m.moe_router_topk) * expert
    engram_rows = engram_sparse = 0
    if cfg.engram.enabled:
        e = cfg.engram
        sizes = table_head_sizes(e)
        engram_rows = int(sizes.sum())
        activated += engram_block_parameters(cfg) + sizes.size * e.head_dim  # one row read per head
        engram_sparse = (engram_rows - sizes.size) * e.head_dim
    return Accounting(
        total=activated + expert_sparse + engram_sparse,
        activated=activated,
        expert_sparse=expert_sparse,
        engram_sparse=engram_sparse,
        engram_rows=engram_rows,
        routed_experts=m.num_experts,
    )


@dataclass(frozen=True)
class AllocationPlan:
    requested_ratio: float
    target_total: int
    target_activated: int
    accounting: Accounting
    num_experts: int
    rows_per_head: int | None  # None: no Engram (rho = 1)
    shared_expert_width: int

    def to_dict(self) -> dict:
        acc = self.accounting
        return {
            "requested_allocation_ratio": self.requested_ratio,
            "realised_allocation_ratio": acc.allocation_ratio,
            "target_total_params": self.target_total,
            "target_activated_params": self.target_activated,
            "target_sparse_params": self.target_total - self.target_activated,
            "num_experts": self.num_experts,
            "rows_per_head": self.rows_per_head,
            "shared_expert_width": self.shared_expert_width,
            **{f"params/{k}": v for k, v in acc.to_dict().items()},
        }

    def describe(self) -> str:
        acc = self.accounting
        memory = f"{acc.engram_rows:,} Engram rows ({self.rows_per_head} per head)" if self.rows_per_head else "no Engram"
        return (
            f"allocation: rho requested {self.requested_ratio:.3f}, realised {acc.allocation_ratio:.3f}: "
            f"{self.num_experts} routed experts, {memory}, shared expert {self.shared_expert_width}; "
            f"P_tot {acc.total:,} (target {self.target_total:,}), P_act {acc.activated:,} "
            f"(target {self.target_activated:,}), P_sparse {acc.sparse:,}"
        )


def _rows_per_head_for(cfg: Config, target: int, heads: int) -> int:
    """The rows-per-head setting whose distinct prime sizes sum closest to ``heads * target``.

    The primes land above the setting (distinct, searched upward), so start lower by the mean overshoot
    and refine a few times.
    """
    probe = copy.deepcopy(cfg.engram)
    best, best_error, setting = target, None, target
    for _ in range(6):
        probe.rows_per_head = max(2, setting)
        error = int(table_head_sizes(probe).sum()) - heads * target
        if best_error is None or abs(error) < abs(best_error):
            best, best_error = probe.rows_per_head, error
        if error == 0:
            break
        setting = probe.rows_per_head - round(error / heads) if abs(error) >= heads else probe.rows_per_head - (1 if error > 0 else -1)
    return best


def reference_config(cfg: Config) -> Config:
    """The pure-MoE model that fixes the budgets: the backbone preset with ``scaling.reference_experts``."""
    ref = copy.deepcopy(cfg)
    ref.engram.enabled = False
    ref.model.num_experts = cfg.scaling.reference_experts
    return ref


def plan_allocation(cfg: Config, ratio: float) -> AllocationPlan:
    """Routed experts, Engram rows per head and shared-expert width for ``ratio`` at fixed P_tot and P_act.

    Raises ``ConfigError`` naming the nearest feasible setting when the budget cannot be met.
    """
    s, m = cfg.scaling, cfg.model
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"scaling.allocation_ratio={ratio!r} is invalid: must be in [0, 1]")
    if m.num_experts == 0 or _moe_layers(cfg) == 0:
        raise ConfigError("scaling.allocation_ratio needs an MoE backbone: set model.num_experts >= model.moe_router_topk")
    ref = count_parameters(reference_config(cfg))
    target_total = s.total_params or ref.total
    target_activated = s.activated_params or ref.activated
    target_sparse = target_total - target_activated
    topk, hidden, moe_layers = m.moe_router_topk, m.hidden_size, _moe_layers(cfg)
    expert_unit = moe_layers * 3 * hidden * m.moe_ffn_hidden_size  # sparse params of one more routed expert
    column_unit = moe_layers * 3 * hidden  # params of one more shared-expert column
    if target_sparse < 0:
        raise ConfigError(
            f"scaling.total_params={target_total:,} is below scaling.activated_params={target_activated:,}: "
            "P_tot must include P_act"
        )

    planned = copy.deepcopy(cfg)
    if ratio >= 1.0:
        num_experts, rows = topk + round(target_sparse / expert_unit), None
        planned.engram.enabled = False
    else:
        num_experts = topk + round(ratio * target_sparse / expert_unit)
        planned.engram.enabled = True
        heads = len(cfg.engram.layers) * len(cfg.engram.ngram_orders) * cfg.engram.heads_per_order
        memory_sparse = target_sparse - (num_experts - topk) * expert_unit
        rows = memory_sparse // (heads * cfg.engram.head_dim) + 1  # + the row a token reads
        rows = _rows_per_head_for(cfg, int(rows), heads) if rows >= 2 else rows
        if rows < 2:
            # The smallest table (2 rows per head) takes this much of P_sparse: rho can be at most 1 - that share.
            largest = 1.0 - heads * cfg.engram.head_dim / target_sparse
            raise ConfigError(
                f"scaling.allocation_ratio={ratio} leaves {memory_sparse:,} parameters for Engram, below one row per head; "
                f"use a ratio <= {largest:.4f}, or 1.0 for the pure MoE"
            )
        planned.engram.rows_per_head = int(rows)
    planned.model.num_experts = num_experts
    planned.model.moe_shared_expert_intermediate_size = 0
    without_shared = count_parameters(planned).activated
    width = round((target_activated - without_shared) / column_unit)
    if width < 0:
        needed = m.moe_shared_expert_intermediate_size - width
        raise ConfigError(
            f"scaling.allocation_ratio={ratio}: the Engram block and router need {without_shared - target_activated:,} more "
            f"activated parameters than the reference has room for; give the reference a shared expert "
            f"(model.moe_shared_expert_intermediate_size >= {needed}) or raise scaling.activated_params"
        )
    planned.model.moe_shared_expert_intermediate_size = width
    return AllocationPlan(
        requested_ratio=ratio,
        target_total=target_total,
        target_activated=target_activated,
        accounting=count_parameters(planned),
        num_experts=num_experts,
        rows_per_head=planned.engram.rows_per_head if planned.engram.enabled else None,
        shared_expert_width=width,
    )


def apply_allocation(cfg: Config) -> tuple[Config, AllocationPlan | None]:
    """The config a run trains: ``scaling.allocation_ratio`` turned into experts, rows and shared width."""
    if cfg.scaling.allocation_ratio is None:
        return cfg, None
    plan = plan_allocation(cfg, cfg.scaling.allocation_ratio)
    planned = copy.deepcopy(cfg)
    planned.model.num_experts = plan.num_experts
    planned.model.moe_shared_expert_intermediate_size = plan.shared_expert_width
    planned.engram.enabled = plan.rows_per_head is not None
    if plan.rows_per_head is not None:
        planned.engram.rows_per_head = plan.rows_per_head
    return planned, plan
