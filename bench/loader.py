"""Benchmark of the data path (``python bench/loader.py``), measured side by side in one run.

(a) prepare throughput: MB of text per minute through read + dedup + BPE + tokenize + shard writing,
    on a capped slice of the default corpus (per-phase seconds from the manifest).
(b) loader throughput: tokens/s delivered by the training loader of the prepared dataset
    (``data/debian-docs``), with and without the Engram hash ids, for 0/1/2 worker processes.
(c) optional: the tiny trainer's consumption (``--trainer-tokens-per-s``, from its metrics) as a ratio
    to what the loader delivers; > 1 means the loader keeps up.
Prints a table and writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines import prepare  # noqa: E402
from engram_train.config import DataConfig, EngramConfig  # noqa: E402
from engram_train.data import build_train_loader, open_dataset  # noqa: E402
from engram_train.engram import NgramHasher  # noqa: E402


def bench_prepare(mb: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds"
        manifest, _ = prepare.prepare(prepare.parse_args(
            ["--out", str(out), "--max-mb", str(mb), "--val-max-mb", str(max(0.2, mb / 20)), "--tokenizer-train-mb", str(min(8, mb))]))
    text_mb = (manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"]) / 1e6
    return {"text_mb": text_mb, "mb_per_min": manifest["text_mb_per_min"], **manifest["timings"],
            "tokens": manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]}


def bench_loader(data_path: str, workers: int, hashed: bool, batches: int, micro_batch: int) -> float:
    """Tokens/s over ``batches`` batches after the first (which pays the worker start-up)."""
    cfg = DataConfig(path=data_path, num_workers=workers)
    dataset = open_dataset(cfg)
    hasher = NgramHasher.from_config(EngramConfig(), dataset.compression, pad_token_id=dataset.eos_id) if hashed else None
    loader = build_train_loader(cfg, micro_batch_size=micro_batch, hasher=hasher, dp_rank=0, dp_world=1, seed=0, dataset=dataset)
    next(loader)
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(loader)["tokens"][:, :-1].numel()
    elapsed = time.perf_counter() - start
    loader.close()
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "debian-docs"), help="prepared dataset (make data)")
    parser.add_argument("--prepare-mb", type=float, default=8, help="MB of text for the prepare benchmark (0: skip)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--trainer-tokens-per-s", type=float, default=0, help="tiny trainer's tokens/s, if measured")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader.json"))
    args = parser.parse_args()

    results: dict = {}
    if args.prepare_mb > 0:
        results["prepare"] = p = bench_prepare(args.prepare_mb)
        print(f"prepare: {p['text_mb']:.1f} MB of text in {p['total_s']:.1f} s = {p['mb_per_min']:.1f} MB/min "
              f"(read+dedup {p['read_dedup_s']:.1f} s, tokenizer {p['tokenizer_s']:.1f} s, "
              f"tokenize {p['tokenize_train_s'] + p['tokenize_val_s']:.1f} s, write {p['write_train_s'] + p['write_val_s']:.1f} s)")

    print(f"\nloader tokens/s on {args.data} (micro-batch {args.micro_batch}, {args.batches} batches, default EngramConfig hashing)")
    print(f"{'workers':>8} {'no hash':>12} {'with hash':>12} {'hash cost':>10}")
    results["loader"] = {}
    for workers in (0, 1, 2):
        plain = bench_loader(args.data, workers, False, args.batches, args.micro_batch)
        hashed = bench_loader(args.data, workers, True, args.batches, args.micro_batch)
        results["loader"][f"workers_{workers}"] = {"tokens_per_s": plain, "hashed_tokens_per_s": hashed}
        print(f"{workers:>8} {plain:>12,.0f} {hashed:>12,.0f} {plain / hashed:>9.2f}x")
    if args.trainer_tokens_per_s:
        best = max(r["hashed_tokens_per_s"] for r in results["loader"].values())
        results["loader_over_trainer"] = best / args.trainer_tokens_per_s
        print(f"\nloader (hashed, best) / trainer consumption = {results['loader_over_trainer']:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
