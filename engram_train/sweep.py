"""Allocation-ratio sweeps: each run's ``result.json``, and the analyzer that reads a sweep back.

    python -m engram_train.sweep analyze outputs/sweeps/<name> [more sweep dirs] [--out DIR]
    python -m engram_train.sweep analyze <dirs> --infinite-memory

A run writes ``result.json`` when it finishes (``write_run_result``). The analyzer collects every
``result.json`` below the given folders, groups them by budget and series, fits validation loss against
the realised allocation ratio (a quadratic, the simplest curve that can hold a U), puts a bootstrap
interval over seeds on the argmin, says when the minimum sits at an end of the range, and writes a
table (``summary.md``, ``analysis.json``), a PNG and the same table and plot to W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from engram_train.atomic_files import atomic_write_text
from engram_train.config import WandbConfig

#: Fewest distinct rho values a loss curve is fit on (and picked as a budget's headline curve with).
MIN_FIT_POINTS = 4
#: The main curve of a sweep, and the controls beside it (scaling.series).
MAIN_SERIES = "engram"
NULL_MEMORY_SERIES = "null_memory"
LR_SERIES = "lr_sweep"
INFINITE_MEMORY_SERIES = "infinite_memory"


def write_run_result(run_dir: Path, cfg, summary: dict, record: dict, *, state: dict, flops_per_token: float,
                     eval_tokens: int, machine: dict) -> Path:
    """``result.json``: what the analyzer needs from one finished run, and the ``machine`` it ran on, written
    atomically."""
    allocation = record.get("allocation", {})
    result = {
        "sweep": cfg.experiment.name,
        "budget": cfg.scaling.budget,
        "series": cfg.scaling.series,
        "seed": cfg.experiment.seed,
        "lr": cfg.optim.lr,
        "warmup_fraction": cfg.optim.warmup_fraction,
        "null_memory": bool(cfg.engram.enabled and cfg.engram.null_memory),
        "engram": cfg.engram.enabled,
        "requested_allocation_ratio": allocation.get("requested_allocation_ratio"),
        "realised_allocation_ratio": record["params"]["allocation_ratio"],
        "params": record["params"],
        "allocation": allocation,
        "tokens": summary["tokens_seen"],
        "flops_per_token": flops_per_token,
        "flops": flops_per_token * summary["tokens_seen"],
        "tokens_per_param": summary["tokens_seen"] / max(1, record["params"]["total"]),
        "final_val_loss": summary["final_val_loss"],
        "val_loss_stderr": summary["val_loss_stderr"],
        "val_tokens": eval_tokens,
        "final_train_loss": summary["final_train_loss"],
        "tokens_per_s": state["tokens_seen"] / state["train_seconds"] if state.get("train_seconds") else None,
        "wall_time_s": state.get("train_seconds"),
        "steps": summary["steps"],
        "skipped_steps": summary["skipped_steps"],
        "machine": machine,
    }
    path = Path(run_dir) / "result.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def collect(dirs: list[Path]) -> list[dict]:
    """Every ``result.json`` below ``dirs`` (a run still training has none and is left out)."""
    results = []
    for root in dirs:
        if not Path(root).exists():
            raise FileNotFoundError(f"{root}: no such sweep folder")
        for path in sorted(Path(root).rglob("result.json")):
            result = json.loads(path.read_text())
            result["path"] = str(path.parent)
            results.append(result)
    return results


def _mean_by_ratio(runs: list[dict]) -> list[tuple[float, list[float]]]:
    """(realised rho, [val loss of each seed]) per distinct realised rho, ascending."""
    groups: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        groups[round(run["realised_allocation_ratio"], 6)].append(run["final_val_loss"])
    return sorted(groups.items())


def fit_allocation_curve(points: list[tuple[float, list[float]]], *, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Quadratic fit of loss vs rho, its argmin on the measured range, and a bootstrap interval over seeds.

    Each bootstrap replicate redraws every point's seeds with replacement; a point measured with one seed
    gets Gaussian noise of the pooled seed spread instead (of the scatter around the fit when no point has
    two seeds), so every point carries its noise into the interval. The argmin is searched on the measured range only: a
    minimum at either end means the optimum was not bracketed.
    """
    if len(points) < MIN_FIT_POINTS:
        raise ValueError(f"need at least {MIN_FIT_POINTS} distinct allocation ratios to fit a curve, got {len(points)} "
                         "(a quadratic through 3 points leaves no scatter to estimate the noise from)")
    x = np.array([p[0] for p in points])
    means = np.array([np.mean(p[1]) for p in points])
    spreads = [np.var(p[1], ddof=1) for p in points if len(p[1]) > 1]
    seed_std = float(np.sqrt(np.mean(spreads))) if spreads else 0.0
    residual = means - np.polyval(np.polyfit(x, means, 2), x)
    if spreads:
        noise, noise_source = seed_std, "pooled spread of repeated seeds"
    else:
        # No repeated seed yet: the scatter around the fit is the only noise estimate (it also holds misfit).
        noise = float(np.sqrt(np.sum(residual**2) / max(1, len(x) - 3)))
        noise_source = "scatter around the fit (no point has two seeds yet)"
    lo, hi = float(x.min()), float(x.max())
    grid = np.linspace(lo, hi, 1001)
    edge_tol = (hi - lo) * 0.01

    def argmin(values: np.ndarray) -> float:
        coeffs = np.polyfit(x, values, 2)
        return float(grid[np.argmin(np.polyval(coeffs, grid))])

    coeffs = np.polyfit(x, means, 2)
    best = argmin(means)
    rng = np.random.default_rng(seed)
    draws = np.empty(bootstrap)
    for b in range(bootstrap):
        sample = np.array([
            np.mean(rng.choice(p[1], size=len(p[1]))) if len(p[1]) > 1 else p[1][0] + rng.normal(0.0, noise)
            for p in points
        ])
        draws[b] = argmin(sample)
    at_edge = float(np.mean((draws <= lo + edge_tol) | (draws >= hi - edge_tol)))
    interior = lo + edge_tol < best < hi - edge_tol
    if interior:
        verdict = (f"interior minimum at rho = {best:.2f} (90% bootstrap interval {np.quantile(draws, 0.05):.2f}"
                   f"-{np.quantile(draws, 0.95):.2f}; {at_edge:.0%} of replicates at an end of the range)")
    else:
        end = "rho = %.2f (%s end)" % (best, "low" if best <= lo + edge_tol else "high")
        shape = "" if coeffs[0] > 0 else " (the fit opens downward: a hump, not a U)"
        verdict = (f"no interior minimum{shape}: the fitted loss is lowest at {end} of the measured range "
                   f"[{lo:.2f}, {hi:.2f}]; {at_edge:.0%} of bootstrap replicates put it at an end")
    return {
        "coefficients": coeffs.tolist(),
        "argmin": best,
        "argmin_interval_90": [float(np.quantile(draws, 0.05)), float(np.quantile(draws, 0.95))],
        "argmin_at_edge_share": at_edge,
        "interior": bool(interior),
        "seed_std": seed_std,
        "noise": noise,
        "noise_source": noise_source,
        "fit_rmse": float(np.sqrt(np.mean(residual**2))),
        "range": [lo, hi],
        "best_measured": {"ratio": float(x[np.argmin(means)]), "val_loss": float(means.min())},
        "verdict": verdict,
    }


def fit_power_law(rows: np.ndarray, losses: np.ndarray) -> dict:
    """loss = a * rows^(-alpha): a straight line in log-log, as the paper's infinite-memory plot."""
    slope, intercept = np.polyfit(np.log(rows), np.log(losses), 1)
    predicted = slope * np.log(rows) + intercept
    ss_res = float(np.sum((np.log(losses) - predicted) ** 2))
    ss_tot = float(np.sum((np.log(losses) - np.log(losses).mean()) ** 2))
    return {"alpha": float(-slope), "a": float(math.exp(intercept)), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "rows_decades": float(np.log10(rows.max() / rows.min()))}


def _by_budget(results: list[dict]) -> dict[str, list[dict]]:
    budgets: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        budgets[r.get("budget") or r["sweep"]].append(r)
    return dict(sorted(budgets.items(), key=lambda kv: min(r["flops"] for r in kv[1])))


def curves_by_lr(runs: list[dict]) -> dict[float, list[dict]]:
    """The loss-vs-rho curve at each learning rate: main and lr_sweep runs together (an lr_sweep run at some rho is
    the main experiment at another learning rate), one run per (rho, seed) and learning rate."""
    by_lr: dict[float, dict[tuple, dict]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r["series"] != MAIN_SERIES):
        if r["series"] in (MAIN_SERIES, LR_SERIES):
            by_lr[r["lr"]].setdefault((r["requested_allocation_ratio"], r["seed"]), r)
    return {lr: list(curve.values()) for lr, curve in sorted(by_lr.items())}


def headline_lr(curves: dict[float, list[dict]], runs: list[dict]) -> float | None:
    """The tuned learning rate whose curve the fit is reported on: among curves with at least MIN_FIT_POINTS rho values, the one
    with the lowest mean loss over the rho values all of them measured (a curve at an untuned rate would put the
    question's answer at the mercy of the optimiser). Without such a curve, the main series' learning rate."""
    full = {lr: dict(_mean_by_ratio(curve)) for lr, curve in curves.items() if len(_mean_by_ratio(curve)) >= MIN_FIT_POINTS}
    if not full:
        main = [r["lr"] for r in runs if r["series"] == MAIN_SERIES]
        return max(set(main), key=main.count) if main else None
    common = set.intersection(*(set(points) for points in full.values()))
    score = {lr: np.mean([np.mean(v) for x, v in points.items() if not common or x in common]) for lr, points in full.items()}
    return min(score, key=score.get)


def analyze_allocation(results: list[dict], *, bootstrap: int = 2000) -> dict:
    """Per budget: the curve at the tuned learning rate (table and fit), the curves at the other learning rates,
    the null-memory control and memory's share, the lr sweep."""
    analysis = {}
    for budget, runs in _by_budget(results).items():
        curves = curves_by_lr(runs)
        lr = headline_lr(curves, runs)
        main = curves.get(lr, [])
        points = _mean_by_ratio(main)
        entry: dict = {
            "tokens": sorted({r["tokens"] for r in runs}),
            "flops": float(np.median([r["flops"] for r in runs])),
            "tokens_per_param": float(np.median([r["tokens_per_param"] for r in main])) if main else None,
            "lr": lr,
            "rows": [_row(r) for r in sorted(runs, key=lambda r: (r["series"], r["realised_allocation_ratio"], r["lr"], r["seed"]))],
            "points": _points(points),
            "other_lrs": {},
        }
        entry.update(_fits(points, bootstrap))
        for other, curve in curves.items():
            other_points = _mean_by_ratio(curve)
            if other != lr and len(other_points) >= 2:
                entry["other_lrs"][other] = {"points": _points(other_points)}
                if len(other_points) >= MIN_FIT_POINTS:
                    entry["other_lrs"][other]["fit"] = fit_allocation_curve(other_points, bootstrap=bootstrap)
        envelope = tuned_envelope(curves)
        env_points = [(x, v) for x, v, _ in envelope]
        tuned_runs = [r for x, _, best_lr in envelope for r in curves[best_lr]
                      if round(r["realised_allocation_ratio"], 6) == x]
        entry["envelope"] = {"points": [{**p, "lr": lr} for p, (*_, lr) in zip(_points(env_points), envelope)],
                             "paired": paired_by_seed(_losses_by_seed(tuned_runs)), **_fits(env_points, bootstrap)}
        entry["paired"] = paired_by_seed(_losses_by_seed(main))
        entry["null_memory"] = _memory_share(runs, curves)
        entry["lr_sweep"] = _lr_table(runs)
        entry["machines"] = machines(runs)
        analysis[budget] = entry
    return analysis


def _fits(points: list[tuple[float, list[float]]], bootstrap: int) -> dict:
    """``fit`` over all points and, where the pure MoE ends the curve, ``fit_without_moe``: it is the one arm without
    the Engram block, and a step there can make a quadratic through all points turn over inside the range. Fitting the
    Engram arms alone says whether the minimum survives."""
    fits = {}
    if len(points) >= MIN_FIT_POINTS:
        fits["fit"] = fit_allocation_curve(points, bootstrap=bootstrap)
    if len(points) >= MIN_FIT_POINTS + 1 and points[-1][0] >= 1.0:
        fits["fit_without_moe"] = fit_allocation_curve(points[:-1], bootstrap=bootstrap)
    return fits


def tuned_envelope(curves: dict[float, list[dict]]) -> list[tuple[float, list[float], float]]:
    """(realised rho, seeds' val losses, lr) with each rho at the learning rate whose seed mean is lowest there: the
    loss curve a scaling study reports, every arm tuned alike. The min over rates favours a rate measured with fewer
    seeds (its mean is noisier), by at most about the seed spread."""
    best: dict[float, tuple[list[float], float]] = {}
    for lr, curve in curves.items():
        for x, losses in _mean_by_ratio(curve):
            if x not in best or np.mean(losses) < np.mean(best[x][0]):
                best[x] = (losses, lr)
    return [(x, losses, lr) for x, (losses, lr) in sorted(best.items())]


def _losses_by_seed(runs: list[dict]) -> dict[float, dict[int, float]]:
    """realised rho -> {seed: val loss}, for runs holding one learning rate per rho."""
    by_ratio: dict[float, dict[int, float]] = defaultdict(dict)
    for r in runs:
        by_ratio[round(r["realised_allocation_ratio"], 6)][r["seed"]] = r["final_val_loss"]
    return by_ratio


def paired_by_seed(by_ratio: dict[float, dict[int, float]]) -> list[dict]:
    """The best measured rho (lowest seed mean) against each end of the range, seed by seed.

    Runs of one seed share the data order and the validation set, so much of what moves a seed's loss moves it
    at every rho: the difference within a seed is a sharper test of "rho x beats rho 0" than the gap between seed
    means measured against the seed spread. Only seeds measured at both rho values count."""
    if len(by_ratio) < 3:
        return []
    means = {x: float(np.mean(list(v.values()))) for x, v in by_ratio.items()}
    best = min(means, key=means.get)
    ends = [x for x in (min(by_ratio), max(by_ratio)) if x != best]
    pairs = []
    for end in ends:
        seeds = sorted(set(by_ratio[best]) & set(by_ratio[end]))
        if not seeds:
            continue
        diffs = np.array([by_ratio[best][s] - by_ratio[end][s] for s in seeds])
        pairs.append({"rho": best, "against": end, "seeds": seeds, "differences": diffs.tolist(),
                      "mean": float(diffs.mean()),
                      "stderr": float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None,
                      "lower_in": int(np.sum(diffs < 0))})
    return pairs


def machines(runs: list[dict]) -> dict[str, int]:
    """Runs per CPU and kernel set: losses at these scales differ across CPU vendors, so a comparison is cleanest
    within one machine. Runs written before ``result.json`` recorded it count as "not recorded"."""
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        m = r.get("machine")
        counts[f"{m['cpu']} ({m['aten_cpu_capability']})" if m else "not recorded"] += 1
    return dict(sorted(counts.items()))


def _points(points: list[tuple[float, list[float]]]) -> list[dict]:
    return [{"ratio": x, "val_loss": float(np.mean(v)), "seeds": len(v), "spread": float(np.ptp(v))} for x, v in points]


def _row(r: dict) -> dict:
    p = r["params"]
    return {"series": r["series"], "rho_requested": r["requested_allocation_ratio"], "rho": r["realised_allocation_ratio"],
            "experts": p["routed_experts"], "engram_rows": p["engram_rows"], "P_tot": p["total"], "P_act": p["activated"],
            "lr": r["lr"], "seed": r["seed"], "tokens": r["tokens"], "val_loss": r["final_val_loss"],
            "val_stderr": r["val_loss_stderr"], "tokens_per_s": r["tokens_per_s"], "path": r.get("path")}


def _memory_share(runs: list[dict], curves: dict[float, list[dict]]) -> list[dict]:
    """At each rho with a null-memory run: what the block alone and the memory add over the pure MoE, all three at
    the null-memory run's learning rate. Compared with the pure MoE of the same seed where there is one (seeds
    move the loss as much as rho does here), else with the mean over its seeds; a share only where Engram beats
    that MoE."""
    shares = []
    for null in (r for r in runs if r["series"] == NULL_MEMORY_SERIES):
        main = curves.get(null["lr"], [])
        moe_by_seed = {r["seed"]: r["final_val_loss"] for r in main if not r["engram"]}
        same = [r["final_val_loss"] for r in main
                if r["requested_allocation_ratio"] == null["requested_allocation_ratio"] and r["seed"] == null["seed"]]
        if not same or not moe_by_seed:
            continue
        paired = null["seed"] in moe_by_seed
        moe = moe_by_seed[null["seed"]] if paired else float(np.mean(list(moe_by_seed.values())))
        total_gain = moe - same[0]
        memory_gain = null["final_val_loss"] - same[0]
        shares.append({"rho": null["requested_allocation_ratio"], "seed": null["seed"], "lr": null["lr"], "moe": moe, "moe_same_seed": paired,
                       "null_memory": null["final_val_loss"], "engram": same[0], "gain_total": total_gain,
                       "gain_memory": memory_gain, "memory_share": memory_gain / total_gain if total_gain > 0 else None})
    return shares


def _lr_table(runs: list[dict]) -> list[dict]:
    """Val loss by learning rate for each arm that was swept (runs of the main and lr_sweep series)."""
    arms: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["series"] in (MAIN_SERIES, LR_SERIES):
            arms[(r["requested_allocation_ratio"],)][r["lr"]].append(r["final_val_loss"])
    table = []
    for (rho,), by_lr in sorted(arms.items(), key=lambda kv: -1 if kv[0][0] is None else kv[0][0]):
        if len(by_lr) < 2:
            continue
        losses = {lr: float(np.mean(v)) for lr, v in sorted(by_lr.items())}
        table.append({"rho": rho, "val_loss_by_lr": losses, "best_lr": min(losses, key=losses.get)})
    return table


def analyze_infinite_memory(results: list[dict]) -> dict:
    """One power law per budget and learning rate (a rate changes the whole curve, so runs at different rates are
    never fitted together); seeds at the same row count are averaged."""
    runs = [r for r in results if r["series"] == INFINITE_MEMORY_SERIES]
    groups: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r.get("budget") or r["sweep"], r["lr"])][r["params"]["engram_rows"]].append(r["final_val_loss"])
    out = {}
    for (budget, lr), by_rows in groups.items():
        rows = np.array(sorted(by_rows), dtype=float)
        losses = np.array([np.mean(by_rows[int(n)]) for n in rows])
        entry = {"budget": budget, "lr": lr, "rows": rows.tolist(), "val_loss": losses.tolist(),
                 "seeds": [len(by_rows[int(n)]) for n in rows],
                 "low": [min(by_rows[int(n)]) for n in rows], "high": [max(by_rows[int(n)]) for n in rows]}
        if len(rows) >= 2:
            entry["fit"] = fit_power_law(rows, losses)
        out[f"{budget}, lr {lr:g}"] = entry
    return out


def _paired_line(pair: dict, where: str) -> str:
    diffs = ", ".join(f"{d:+.4f} (seed {s})" for d, s in zip(pair["differences"], pair["seeds"]))
    spread = f" ± {pair['stderr']:.4f}" if pair["stderr"] is not None else ""
    return (f"- paired by seed ({where}), rho {pair['rho']:.2f} minus rho {pair['against']:.2f}: {diffs}; "
            f"mean {pair['mean']:+.4f}{spread}, lower in {pair['lower_in']} of {len(pair['seeds'])} seeds")


def markdown(analysis: dict, memory: dict | None = None) -> str:
    lines = []
    for budget, entry in analysis.items():
        lines += [f"## Budget {budget}: {', '.join(f'{t:,}' for t in entry['tokens'])} tokens, "
                  f"{entry['flops']:.3g} FLOPs, {entry['tokens_per_param'] or 0:.1f} tokens per parameter, lr {entry['lr']:g}"
                  + (f" (of the learning rates {', '.join(f'{lr:g}' for lr in sorted([entry['lr'], *entry['other_lrs']]))}, the one"
                     f" whose curve over >= {MIN_FIT_POINTS} rho values is lowest; fit and plot on it)" if entry["other_lrs"] else ""), "",
                  "| series | rho req. | rho real. | experts | Engram rows | P_tot | P_act | lr | seed | val loss | ± stderr | tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            req = "-" if r["rho_requested"] is None else f"{r['rho_requested']:.2f}"
            lines.append(f"| {r['series']} | {req} | {r['rho']:.3f} | {r['experts']} | {r['engram_rows']:,} | {r['P_tot']:,} | "
                         f"{r['P_act']:,} | {r['lr']:g} | {r['seed']} | {r['val_loss']:.4f} | {r['val_stderr']:.4f} | "
                         f"{(r['tokens_per_s'] or 0):,.0f} |")
        if "fit" in entry:
            lines += ["", f"Fit (quadratic in realised rho, {len(entry['points'])} points, noise {entry['fit']['noise']:.4f} from the "
                      f"{entry['fit']['noise_source']}): "
                      f"{entry['fit']['verdict']}. Best measured point: rho {entry['fit']['best_measured']['ratio']:.2f}, "
                      f"val loss {entry['fit']['best_measured']['val_loss']:.4f}."]
        if "fit_without_moe" in entry:
            lines.append(f"- the same curve without the pure MoE (rho < 1, the Engram arms only): "
                         f"{entry['fit_without_moe']['verdict']}")
        if entry["envelope"]["points"]:
            env = entry["envelope"]
            values = ", ".join(f"{p['ratio']:.2f}: {p['val_loss']:.4f} ({p['lr']:g}, {p['seeds']} seed{'s' if p['seeds'] > 1 else ''})"
                               for p in env["points"])
            verdict = f"; fit: {env['fit']['verdict']}" if "fit" in env else ""
            verdict += f"; without the pure MoE: {env['fit_without_moe']['verdict']}" if "fit_without_moe" in env else ""
            lines.append(f"- each rho at its own best learning rate (rho: val loss (lr, seeds)): {values}{verdict}")
            lines += [_paired_line(pair, "each at its own best learning rate") for pair in env["paired"]]
        for other, curve in entry["other_lrs"].items():
            values = ", ".join(f"{p['ratio']:.2f}: {p['val_loss']:.4f}" for p in curve["points"])
            verdict = f"; fit: {curve['fit']['verdict']}" if "fit" in curve else ""
            lines.append(f"- curve at lr {other:g} (rho: val loss): {values}{verdict}")
        lines += [_paired_line(pair, f"lr {entry['lr']:g}") for pair in entry["paired"]]
        for s in entry["null_memory"]:
            moe = f"MoE {s['moe']:.4f} ({'same seed' if s['moe_same_seed'] else 'mean over seeds'})"
            head = (f"- rho {s['rho']}, seed {s['seed']}, lr {s['lr']:g}: {moe}, null-memory block {s['null_memory']:.4f}, "
                    f"Engram {s['engram']:.4f}: memory adds {s['gain_memory']:.4f} over the block alone")
            if s["memory_share"] is None:
                lines.append(f"{head}; Engram is not better than that MoE ({-s['gain_total']:+.4f}), so no share")
            elif s["memory_share"] < 0:
                lines.append(f"{head}: the block alone beats Engram here, so all of Engram's {s['gain_total']:.4f} nats over "
                             "that MoE come from the block, none from memory")
            elif s["memory_share"] > 1:
                lines.append(f"{head}; the block alone is {s['null_memory'] - s['moe']:.4f} worse than that MoE, so memory "
                             f"makes up for it and gains the {s['gain_total']:.4f} nats Engram is ahead")
            else:
                lines.append(f"{head}, of the {s['gain_total']:.4f} nats Engram gains ({s['memory_share']:.0%})")
        for t in entry["lr_sweep"]:
            arm = "pure MoE" if t["rho"] in (None, 1.0) else f"rho {t['rho']}"
            values = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in t["val_loss_by_lr"].items())
            lines.append(f"- lr sweep, {arm}: {values} (best {t['best_lr']:g})")
        if entry["lr_sweep"]:
            best = ", ".join(f"{'MoE' if t['rho'] in (None, 1.0) else t['rho']}: {t['val_loss_by_lr'][t['best_lr']]:.4f} "
                             f"({t['best_lr']:g})" for t in entry["lr_sweep"])
            lines.append(f"- each arm at its own best learning rate (seed means; a rate run with fewer seeds is favoured "
                         f"by the min): {best}")
        if set(entry["machines"]) != {"not recorded"}:
            lines.append("- machines (runs): " + ", ".join(f"{name}: {n}" for name, n in entry["machines"].items()))
        lines.append("")
    for budget, entry in (memory or {}).items():
        lines.append(f"## Infinite memory, budget {budget}" + (f" (seeds per point: {entry['seeds']})" if max(entry["seeds"]) > 1 else ""))
        lines += [f"- {int(r):,} rows: val loss {v:.4f}" + (f" (seeds {lo:.4f}-{hi:.4f})" if n > 1 else "")
                  for r, v, n, lo, hi in zip(entry["rows"], entry["val_loss"], entry["seeds"], entry["low"], entry["high"])]
        if "fit" in entry:
            f = entry["fit"]
            lines.append(f"- power law loss = {f['a']:.3f} * rows^-{f['alpha']:.4f} over {f['rows_decades']:.1f} decades (R² {f['r2']:.3f})")
        lines.append("")
    return "\n".join(lines)


def plotted_fit(entry: dict) -> tuple[dict | None, str]:
    """The fit the plot draws: each rho at its own best rate without the pure MoE where there is one (the curve
    both arms tuned alike, and no step at rho = 1 read as a minimum), else the widest fit there is."""
    env = entry["envelope"]
    for fit, label in ((env.get("fit_without_moe"), "quadratic fit, rho < 1, each at its best lr"),
                       (env.get("fit"), "quadratic fit, each rho at its best lr"),
                       (entry.get("fit"), f"quadratic fit, lr {entry['lr']:g}")):
        if fit is not None:
            return fit, label
    return None, ""


def plot(analysis: dict, results: list[dict], path: Path, memory: dict | None = None) -> Path:
    """One panel per budget (each on its own loss scale: budgets differ by far more than rho moves the loss),
    plus the infinite-memory panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = len(analysis) + (1 if memory else 0)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, grid_axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.6 * rows), squeeze=False)
    axes = grid_axes.ravel()
    for unused in axes[panels:]:
        unused.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (budget, entry) in enumerate(analysis.items()):
        ax, color = axes[i], colors[i % len(colors)]
        seeds = defaultdict(list)
        for r in entry["rows"]:
            if r["series"] in (MAIN_SERIES, LR_SERIES) and r["lr"] == entry["lr"]:
                seeds[round(r["rho"], 6)].append(r["val_loss"])
        xs = [p["ratio"] for p in entry["points"]]
        ys = [p["val_loss"] for p in entry["points"]]
        lo = [y - min(seeds[round(x, 6)]) for x, y in zip(xs, ys)]
        hi = [max(seeds[round(x, 6)]) - y for x, y in zip(xs, ys)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3,
                    label=f"Engram + MoE, lr {entry['lr']:g} (bars: seed range)")
        fit, fit_label = plotted_fit(entry)
        if fit is not None:
            grid = np.linspace(*fit["range"], 200)
            ax.plot(grid, np.polyval(fit["coefficients"], grid), "-", color=color, alpha=0.6, label=fit_label)
            ymin = float(np.polyval(fit["coefficients"], fit["argmin"]))
            ax.errorbar([fit["argmin"]], [ymin], xerr=[[fit["argmin"] - fit["argmin_interval_90"][0]],
                        [fit["argmin_interval_90"][1] - fit["argmin"]]], fmt="*", ms=13, color="black", capsize=4,
                        label=f"fitted min {fit['argmin']:.2f} (90% bootstrap)" + ("" if fit["interior"] else ", range end"))
        env = entry["envelope"]["points"]
        if env and any(p["lr"] != entry["lr"] for p in env):
            ax.plot([p["ratio"] for p in env], [p["val_loss"] for p in env], "D-", ms=5, lw=1, color="black", alpha=0.7,
                    label="each rho at its best lr (envelope)")
        nulls = [r for r in entry["rows"] if r["series"] == NULL_MEMORY_SERIES and r["lr"] == entry["lr"]]
        if nulls:
            ax.plot([r["rho_requested"] for r in nulls], [r["val_loss"] for r in nulls], "s", mfc="none", ms=8,
                    color="tab:red", label="null memory (block, 1 row/head)")
        # The loss scale is the tuned curve's (and its controls'): other learning rates can sit far above it.
        shown = ([y - l for y, l in zip(ys, lo)] + [y + h for y, h in zip(ys, hi)] + [r["val_loss"] for r in nulls]
                 + [p["val_loss"] for p in env])
        # Lower curves (a better learning rate measured at fewer rho values) stay in view; higher ones may not.
        shown += [p["val_loss"] for c in entry["other_lrs"].values() for p in c["points"] if shown and p["val_loss"] < min(shown)]
        bottom, top = (min(shown), max(shown)) if shown else (0.0, float("inf"))
        pad = (top - bottom or 0.05) if shown else 0.0
        for j, (other, curve) in enumerate(entry["other_lrs"].items()):
            values = [p["val_loss"] for p in curve["points"]]
            off = "" if min(values) <= top + 0.4 * pad else f", off scale: {min(values):.3f}-{max(values):.3f}"
            ax.plot([p["ratio"] for p in curve["points"]], values, "x--", lw=0.8,
                    color=plt.cm.Greys(0.45 + 0.4 * j / max(1, len(entry["other_lrs"]) - 1)),
                    label=f"lr {other:g} (seed mean{off})")
        if shown:
            ax.set_ylim(bottom - 0.15 * pad, top + 0.4 * pad)
        ax.set_title(f"{budget}: {', '.join(f'{t / 1e6:.2g}M' for t in entry['tokens'])} tokens, "
                     f"{entry['tokens_per_param'] or 0:.0f} tokens/param", fontsize=10)
        ax.set_xlabel("allocation ratio rho (routed experts' share of sparse params)")
        ax.set_ylabel("validation loss (nats)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if memory:
        ax2 = axes[panels - 1]
        for i, (budget, entry) in enumerate(memory.items()):
            ax2.errorbar(entry["rows"], entry["val_loss"], fmt="o", color=colors[i % len(colors)], capsize=3,
                         yerr=[np.subtract(entry["val_loss"], entry["low"]), np.subtract(entry["high"], entry["val_loss"])],
                         label=budget + (" (bars: seed range)" if max(entry["seeds"]) > 1 else ""))
            ax2.set_xscale("log")
            ax2.set_yscale("log")
            if "fit" in entry:
                f = entry["fit"]
                ax2.plot(entry["rows"], [f["a"] * r ** -f["alpha"] for r in entry["rows"]], "--",
                         color=colors[i % len(colors)], label=f"{budget}: loss ~ rows^-{f['alpha']:.4f}")
        # Losses span a few percent: plain numbers on the log axis, not 5.8x10^0.
        ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax2.set_xlabel("Engram rows (backbone fixed)")
        ax2.set_ylabel("validation loss (nats)")
        ax2.set_title("Infinite memory", fontsize=10)
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3, which="both")
    fig.suptitle("Validation loss vs allocation ratio at fixed P_tot and P_act", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_wandb(analysis: dict, png: Path, out: Path, *, mode: str, project: str, group: str) -> str | None:
    """The table and plot as one W&B run of job type ``analysis`` in the sweep's group."""
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, group=group, job_type="analysis", name=f"{group}/analysis", mode=mode,
                     dir=str(out), settings=wandb.Settings(console="off", x_disable_stats=True))
    columns = ["budget", "series", "rho_requested", "rho", "experts", "engram_rows", "P_tot", "P_act", "lr", "seed", "val_loss", "val_stderr"]
    table = wandb.Table(columns=columns)
    for budget, entry in analysis.items():
        for r in entry["rows"]:
            table.add_data(budget, *[r[c] for c in columns[1:]])
    run.log({"allocation_ratio/table": table, "allocation_ratio/plot": wandb.Image(str(png))})
    for budget, entry in analysis.items():
        if "fit" in entry:
            run.summary[f"{budget}/argmin"] = entry["fit"]["argmin"]
            run.summary[f"{budget}/interior"] = entry["fit"]["interior"]
    directory = str(Path(run.dir).parent)
    run.finish()
    return directory


def analyze(dirs: list[Path], out: Path | None = None, *, infinite_memory: bool = False, wandb_mode: str = "offline",
            project: str = "engram-train", bootstrap: int = 2000) -> dict:
    results = collect(dirs)
    if not results:
        raise SystemExit(f"no result.json below {', '.join(map(str, dirs))}: no run of these sweeps has finished yet")
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    allocation = analyze_allocation([r for r in results if r["series"] != INFINITE_MEMORY_SERIES], bootstrap=bootstrap)
    memory = analyze_infinite_memory(results) if infinite_memory else None
    text = markdown(allocation, memory)
    (out / "summary.md").write_text(text)
    (out / "analysis.json").write_text(json.dumps({"allocation": allocation, "infinite_memory": memory}, indent=1) + "\n")
    png = plot(allocation, results, out / "allocation_ratio.png", memory)
    group = results[0]["sweep"]
    wandb_dir = log_to_wandb(allocation, png, out, mode=wandb_mode, project=project, group=group)
    print(text)
    print(f"wrote {out / 'summary.md'}, {out / 'analysis.json'}, {png}" + (f"; W&B run {wandb_dir}" if wandb_dir else ""))
    return {"allocation": allocation, "infinite_memory": memory, "png": str(png)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engram_train.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="table, fit and plot of finished sweep runs")
    a.add_argument("dirs", nargs="+", type=Path, help="sweep folders (every result.json below them is read)")
    a.add_argument("--out", type=Path, default=None, help="where summary.md, analysis.json and the PNG go (default: first dir)")
    a.add_argument("--infinite-memory", action="store_true", help="also fit loss vs Engram rows (series infinite_memory)")
    a.add_argument("--wandb", default=WandbConfig().effective_mode(), choices=("offline", "online", "disabled"),
                   help="W&B mode of the analysis run (default: WANDB_MODE, else offline)")
    a.add_argument("--project", default="engram-train")
    a.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates for the argmin interval")
    args = parser.parse_args(argv)
    try:
        analyze(args.dirs, args.out, infinite_memory=args.infinite_memory, wandb_mode=args.wandb, project=args.project,
                bootstrap=args.bootstrap)
    except (FileNotFoundError, ValueError) as error:
        print(f"sweep analyze: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
