"""The sweep analyzer on synthetic results whose answer is known: an interior argmin, an end-of-range minimum,
the memory share of a null-memory control, a power law in table rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engram_train.sweep import analyze, plotted_fit

RATIOS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _result(root: Path, *, rho: float, loss: float, seed: int = 1, series: str = "engram", budget: str = "b1",
            tokens: int = 1000, lr: float = 3e-3, rows: int | None = None, null: bool = False,
            machine: dict | None = None) -> None:
    engram_rows = rows if rows is not None else (0 if rho == 1.0 else int(1000 * (1 - rho)) + 8)
    record = {
        "sweep": "synthetic", "budget": budget, "series": series, "seed": seed, "lr": lr, "null_memory": null,
        "engram": rho < 1.0 or rows is not None, "requested_allocation_ratio": rho, "realised_allocation_ratio": rho,
        "params": {"total": 1000, "activated": 100, "routed_experts": 2 + int(10 * rho), "engram_rows": engram_rows,
                   "allocation_ratio": rho},
        "tokens": tokens, "flops": 6.0 * 100 * tokens, "flops_per_token": 600.0, "tokens_per_param": tokens / 1000,
        "final_val_loss": loss, "val_loss_stderr": 0.001, "tokens_per_s": 1.0, "wall_time_s": 1.0,
        **({"machine": machine} if machine else {}),
    }
    folder = root / f"{budget}-{series}-{rho}-{seed}-{lr}-{rows}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(record))


def test_recovers_a_known_interior_minimum_and_reads_the_controls(tmp_path):
    rng = np.random.default_rng(0)
    for rho in RATIOS:
        for seed in (1, 2):
            _result(tmp_path, rho=rho, seed=seed, loss=3.0 + 0.5 * (rho - 0.62) ** 2 + rng.normal(0, 0.002))
    # Controls at rho 0.6 seed 1: the block alone takes 40% of the gain over the seed-1 MoE, memory 60%; lr sweep of
    # both arms. Against the other seed's MoE the share would differ: the control is paired by seed.
    engram_06 = json.loads(next(tmp_path.glob("b1-engram-0.6-1-*")).joinpath("result.json").read_text())["final_val_loss"]
    moe_seed_1 = json.loads(next(tmp_path.glob("b1-engram-1.0-1-*")).joinpath("result.json").read_text())["final_val_loss"]
    moe = np.mean([json.loads(p.read_text())["final_val_loss"] for p in tmp_path.glob("b1-engram-1.0-*/result.json")])
    _result(tmp_path, rho=0.6, seed=1, series="null_memory", null=True, loss=engram_06 + 0.6 * (moe_seed_1 - engram_06))
    for lr, bump in ((1.5e-3, 0.05), (6e-3, -0.01)):
        _result(tmp_path, rho=1.0, lr=lr, series="lr_sweep", loss=moe + bump)
    out = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=400)["allocation"]["b1"]
    fit = out["fit"]
    assert fit["interior"] and abs(fit["argmin"] - 0.62) < 0.05, fit
    assert fit["argmin_interval_90"][0] - 0.01 <= 0.62 <= fit["argmin_interval_90"][1] + 0.01
    assert fit["argmin_interval_90"][1] - fit["argmin_interval_90"][0] < 0.2
    assert "interior minimum at rho = 0.6" in fit["verdict"]
    assert 0.0003 < fit["seed_std"] < 0.006, "the seed spread of the two seeds per point"
    share = out["null_memory"][0]
    assert share["memory_share"] == pytest.approx(0.6) and share["moe_same_seed"] and share["moe"] == moe_seed_1
    lr_arm = next(t for t in out["lr_sweep"] if t["rho"] == 1.0)
    assert lr_arm["best_lr"] == 6e-3 and len(lr_arm["val_loss_by_lr"]) == 3
    assert out["lr"] == 3e-3, "the main curve is the engram series at its own learning rate"
    assert len(out["points"]) == len(RATIOS), "lr-sweep and null-memory runs stay off the main curve"
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "memory adds" in text and "(60%)" in text and "best 0.006" in text
    assert out["machines"] == {"not recorded": 15} and "machines (runs)" not in text, "older results name no machine"
    assert (tmp_path / "out" / "allocation_ratio.png").stat().st_size > 10_000


def test_names_the_machines_a_budgets_runs_trained_on(tmp_path):
    amd = {"cpu": "AMD EPYC", "aten_cpu_capability": "AVX2", "threads": 1, "gpu": None, "torch": "2.13.0+cpu"}
    intel = {**amd, "cpu": "Intel(R) Xeon(R) Platinum"}
    for i, rho in enumerate(RATIOS):
        _result(tmp_path, rho=rho, loss=3.0 + rho, machine=(amd, intel, None)[i % 3])
    out = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=50)["allocation"]["b1"]
    assert out["machines"] == {"AMD EPYC (AVX2)": 2, "Intel(R) Xeon(R) Platinum (AVX2)": 2, "not recorded": 2}
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "- machines (runs): AMD EPYC (AVX2): 2, Intel(R) Xeon(R) Platinum (AVX2): 2, not recorded: 2" in text


def test_the_fit_is_on_the_curve_at_the_tuned_learning_rate_and_controls_pair_by_lr(tmp_path):
    """Main runs at an untuned 3e-3 (a monotone curve, 0.4 nats higher), lr_sweep runs over the whole range at 6e-3
    (a U with its minimum at 0.7) and at 1.2e-2 (worse): the headline is the 6e-3 curve, the others stay beside
    it, and a null-memory run at 6e-3 is compared with the 6e-3 MoE and Engram runs, not the 3e-3 ones."""
    for rho in RATIOS:
        _result(tmp_path, rho=rho, loss=3.4 + 0.1 * rho)
        _result(tmp_path, rho=rho, lr=6e-3, series="lr_sweep", loss=3.0 + 0.5 * (rho - 0.7) ** 2)
        if rho in (0.0, 0.6, 1.0):
            _result(tmp_path, rho=rho, lr=1.2e-2, series="lr_sweep", loss=3.2 + 0.5 * (rho - 0.7) ** 2)
    engram, moe = 3.0 + 0.5 * 0.1 ** 2, 3.0 + 0.5 * 0.3 ** 2
    _result(tmp_path, rho=0.6, lr=6e-3, series="null_memory", null=True, loss=engram + 0.25 * (moe - engram))
    _result(tmp_path, rho=0.6, series="null_memory", null=True, loss=3.9)
    out = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=200)["allocation"]["b1"]
    assert out["lr"] == 6e-3
    assert out["fit"]["interior"] and abs(out["fit"]["argmin"] - 0.7) < 0.02, out["fit"]
    assert sorted(out["other_lrs"]) == [3e-3, 1.2e-2] and not out["other_lrs"][3e-3]["fit"]["interior"]
    share = next(s for s in out["null_memory"] if s["lr"] == 6e-3)
    assert share["moe"] == pytest.approx(moe) and share["engram"] == pytest.approx(engram)
    assert share["memory_share"] == pytest.approx(0.25)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "lr 0.006 (of the learning rates 0.003, 0.006, 0.012, the one whose curve" in text and "curve at lr 0.003" in text


def test_a_minimum_at_the_end_of_the_range_is_reported_as_such(tmp_path):
    for rho in RATIOS:
        for seed in (1, 2):
            _result(tmp_path, rho=rho, seed=seed, loss=3.0 + 0.2 * rho + 0.001 * seed)
    fit = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=200)["allocation"]["b1"]["fit"]
    assert not fit["interior"] and fit["argmin"] == 0.0
    assert fit["verdict"].startswith("no interior minimum") and "low end" in fit["verdict"]
    assert fit["argmin_at_edge_share"] > 0.95


def test_two_budgets_are_kept_apart_and_the_infinite_memory_power_law_is_recovered(tmp_path):
    for budget, tokens, centre in (("small", 1000, 0.7), ("large", 3000, 0.8)):
        for rho in RATIOS:
            _result(tmp_path, budget=budget, tokens=tokens, rho=rho, loss=2.0 + (rho - centre) ** 2)
    for rows in (100, 1000, 10_000, 100_000):
        _result(tmp_path, budget="small", series="infinite_memory", rho=0.6, rows=rows, loss=5.0 * rows ** -0.03)
        # another learning rate: its own curve, never fitted together with the first; two seeds, averaged
        for seed, noise in ((1, 0.01), (2, -0.01)):
            _result(tmp_path, budget="small", series="infinite_memory", rho=0.6, rows=rows, lr=6e-3, seed=seed,
                    loss=4.0 * rows ** -0.05 + noise)
    result = analyze([tmp_path], tmp_path / "out", infinite_memory=True, wandb_mode="disabled", bootstrap=100)
    assert list(result["allocation"]) == ["small", "large"], "budgets ordered by compute"
    assert result["allocation"]["small"]["fit"]["argmin"] == pytest.approx(0.7, abs=0.01)
    assert result["allocation"]["large"]["fit"]["argmin"] == pytest.approx(0.8, abs=0.01)
    law = result["infinite_memory"]["small, lr 0.003"]["fit"]
    assert law["alpha"] == pytest.approx(0.03, rel=1e-6) and law["r2"] == pytest.approx(1.0)
    assert law["rows_decades"] == pytest.approx(3.0)
    assert result["infinite_memory"]["small, lr 0.006"]["fit"]["alpha"] == pytest.approx(0.05, rel=1e-6)
    seeded = result["infinite_memory"]["small, lr 0.006"]
    assert seeded["seeds"] == [2, 2, 2, 2]
    assert np.subtract(seeded["high"], seeded["low"]) == pytest.approx([0.02] * 4), "the seed range each point is drawn with"


def test_a_step_at_the_pure_moe_is_told_apart_and_each_arm_is_tuned_on_its_own(tmp_path):
    """At the Engram arms' best rate the MoE sits far above them (its own best rate is lower): the quadratic through
    all points turns over inside the range, the fit of the Engram arms alone does not, and the envelope takes each
    rho at its own best rate."""
    rng = np.random.default_rng(1)
    for seed in (1, 2):
        for rho in RATIOS:
            high = 3.5 if rho == 1.0 else 3.0 + 0.05 * rho  # lr 1.2e-2: Engram arms rise slowly, the MoE is off
            low = 3.2 if rho == 1.0 else 3.1 + 0.05 * rho  # lr 6e-3: the MoE's best
            _result(tmp_path, rho=rho, seed=seed, lr=1.2e-2, series="lr_sweep", loss=high + rng.normal(0, 0.001))
            _result(tmp_path, rho=rho, seed=seed, lr=6e-3, series="lr_sweep", loss=low + rng.normal(0, 0.001))
    out = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=200)["allocation"]["b1"]
    assert out["lr"] == 1.2e-2
    assert out["fit"]["interior"], "the MoE's step makes the quadratic turn over"
    alone = out["fit_without_moe"]
    assert not alone["interior"] and alone["argmin"] == pytest.approx(0.0), alone["verdict"]
    envelope = out["envelope"]["points"]
    assert [p["lr"] for p in envelope] == [1.2e-2] * (len(RATIOS) - 1) + [6e-3]
    assert envelope[-1]["val_loss"] == pytest.approx(3.2, abs=0.005) and envelope[-1]["seeds"] == 2
    # the tuned MoE is still above the Engram arms: the step stays, and so does the distinction
    assert out["envelope"]["fit"]["interior"] and not out["envelope"]["fit_without_moe"]["interior"]
    fit, label = plotted_fit(out)
    assert fit == out["envelope"]["fit_without_moe"] and "rho < 1" in label, "the plot draws the fit the text reports"
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "without the pure MoE" in text and "each rho at its own best learning rate" in text


def test_seeds_are_paired_across_rho_so_a_gap_smaller_than_the_seed_spread_shows(tmp_path):
    """Seed offsets of ±0.05 dwarf the 0.018 gap between rho 0.2 and rho 0; within each seed it is exact."""
    offsets = {1: 0.0, 2: 0.05, 3: -0.05}
    for rho in RATIOS:
        for seed, offset in offsets.items():
            _result(tmp_path, rho=rho, seed=seed, loss=3.0 + 0.3 * (rho - 0.25) ** 2 + offset)
    # rho 0 at another rate: better than at the main rate by 0.008 in every seed, still worse than rho 0.2.
    for seed, offset in offsets.items():
        _result(tmp_path, rho=0.0, seed=seed, lr=6e-3, series="lr_sweep", loss=3.0 + 0.3 * 0.25**2 + offset - 0.008)
    out = analyze([tmp_path], tmp_path / "out", wandb_mode="disabled", bootstrap=200)["allocation"]["b1"]
    gap = 0.3 * (0.25**2 - 0.05**2)
    low, high = out["paired"]
    assert (low["rho"], low["against"], low["seeds"]) == (0.2, 0.0, [1, 2, 3])
    assert low["differences"] == pytest.approx([-gap] * 3) and low["lower_in"] == 3
    assert low["stderr"] == pytest.approx(0.0, abs=1e-9)
    assert (high["against"], high["lower_in"]) == (1.0, 3)
    # Each rho at its own best rate: rho 0 is paired at 6e-3, where the gap is 0.008 smaller.
    tuned = out["envelope"]["paired"][0]
    assert (tuned["against"], tuned["seeds"]) == (0.0, [1, 2, 3])
    assert tuned["differences"] == pytest.approx([-gap + 0.008] * 3)
    assert "rho 0.20 minus rho 0.00" in (tmp_path / "out" / "summary.md").read_text()
