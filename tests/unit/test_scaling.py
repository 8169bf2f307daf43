"""The allocation planner: fixed P_tot and P_act across rho, the ends of the range, infeasible requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from engram_train.config import ConfigError, to_config
from engram_train.scaling import apply_allocation, count_parameters, engram_block_parameters, plan_allocation, reference_config

REPO = Path(__file__).resolve().parents[2]

RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def sweep_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "engram_train" / "conf"), version_base=None):
        return to_config(compose(config_name="config", overrides=["experiment=sweep_tiny", *overrides]))


@pytest.mark.parametrize("preset", [[], ["model.hidden_size=64", "model.num_layers=4", "model.moe_layer_freq=2",
                                         "scaling.reference_experts=24", "engram.layers=[1,2]",
                                         "model.moe_shared_expert_intermediate_size=96"]])
def test_budgets_are_held_at_every_ratio(preset):
    cfg = sweep_config(*preset)
    ref = count_parameters(reference_config(cfg))
    column = 3 * cfg.model.hidden_size * sum(1 for i in range(cfg.model.num_layers) if i % cfg.model.moe_layer_freq == 0)
    previous = -1.0
    for ratio in RATIOS:
        plan = plan_allocation(cfg, ratio)
        acc = plan.accounting
        assert abs(acc.total - ref.total) <= 0.01 * ref.total, (ratio, acc, ref)
        # The shared expert pays for the Engram block: P_act moves by at most half a shared-expert column.
        assert abs(acc.activated - ref.activated) <= column // 2, (ratio, acc.activated, ref.activated)
        assert acc.allocation_ratio >= previous, "realised rho must grow with the requested one"
        assert abs(acc.allocation_ratio - ratio) < 0.1
        previous = acc.allocation_ratio
        assert acc.total == acc.activated + acc.expert_sparse + acc.engram_sparse


def test_ends_of_the_range():
    cfg = sweep_config()
    moe = plan_allocation(cfg, 1.0)
    assert moe.rows_per_head is None and moe.accounting.engram_rows == 0
    assert moe.num_experts == cfg.scaling.reference_experts and moe.accounting.allocation_ratio == 1.0
    assert moe.shared_expert_width == cfg.model.moe_shared_expert_intermediate_size
    planned, _ = apply_allocation(sweep_config("scaling.allocation_ratio=1.0"))
    assert not planned.engram.enabled
    memory = plan_allocation(cfg, 0.0)
    assert memory.num_experts == cfg.model.moe_router_topk and memory.accounting.expert_sparse == 0
    assert memory.accounting.allocation_ratio == 0.0
    # Every sparse parameter the experts gave up is now in the table (to the 1% the prime sizes allow).
    assert abs(memory.accounting.engram_sparse - moe.accounting.expert_sparse) <= 0.01 * moe.accounting.total


def test_planned_config_is_what_the_run_trains():
    cfg, plan = apply_allocation(sweep_config("scaling.allocation_ratio=0.6"))
    assert cfg.engram.enabled and cfg.model.num_experts == plan.num_experts
    assert cfg.engram.rows_per_head == plan.rows_per_head
    assert cfg.model.moe_shared_expert_intermediate_size == plan.shared_expert_width
    assert count_parameters(cfg) == plan.accounting
    # Numbers of this preset (2 layers, hidden 32, top-2 of 16 experts of width 16, shared 32), by hand:
    # attention 2*(4*32*32 + 2*32) + final norm 32 = 8,352; router 2*32*16 = 1,024; top-2 experts 2*2*3*32*16 = 6,144;
    # shared 2*3*32*32 = 6,144 -> P_act 21,664; 14 inactive experts 2*14*1,536 = 43,008 -> P_tot 64,672.
    ref = count_parameters(reference_config(sweep_config()))
    assert (ref.activated, ref.total) == (21_664, 64_672)
    assert (plan.target_activated, plan.target_total) == (21_664, 64_672)
    # The rho=0.6 run: Engram block 2*(64*32 + 32) projections with bias + 3*32 norms + 4*32 conv = 4,384 (the
    # trainer prints the same count from the built module), one 8-wide row read per head (8 heads) = 64;
    # router 2*32*10 = 640; shared expert of width 11: 2*3*32*11 = 2,112 -> P_act 8,352+640+6,144+2,112+4,384+64.
    assert engram_block_parameters(cfg) == 4_384
    assert plan.accounting.activated == 8_352 + 640 + 6_144 + 2_112 + 4_384 + 64


def test_null_memory_keeps_the_block_and_the_experts():
    cfg, plan = apply_allocation(sweep_config("scaling.allocation_ratio=0.6", "engram.null_memory=true"))
    real, real_plan = apply_allocation(sweep_config("scaling.allocation_ratio=0.6"))
    assert cfg.model.num_experts == real.model.num_experts
    assert cfg.model.moe_shared_expert_intermediate_size == real.model.moe_shared_expert_intermediate_size
    heads = len(cfg.engram.ngram_orders) * cfg.engram.heads_per_order
    assert plan.accounting.engram_rows == heads and plan.accounting.engram_sparse == 0
    assert plan.accounting.activated == real_plan.accounting.activated


def test_infeasible_requests_name_the_nearest_feasible_setting():
    cfg = sweep_config()
    with pytest.raises(ConfigError, match=r"scaling.allocation_ratio=0.999 leaves .* use a ratio <= 0\.99\d\d, or 1.0"):
        plan_allocation(cfg, 0.999)
    with pytest.raises(ConfigError, match=r"model.moe_shared_expert_intermediate_size >= \d+"):
        plan_allocation(sweep_config("model.moe_shared_expert_intermediate_size=0"), 0.5)
    with pytest.raises(ConfigError, match=r"scaling.allocation_ratio=1.5 is invalid"):
        sweep_config("scaling.allocation_ratio=1.5")
