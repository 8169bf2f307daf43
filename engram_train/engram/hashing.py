"""N-gram hashing: token ids -> row ids of the Engram table (DESIGN.md section 3, steps 1-3).

Follows ``NgramHashMapping`` of DeepSeek's released ``engram_demo_v1.py``: compressed ids, suffix
n-grams left-padded with the compressed pad id, a multiplicative-XOR mix with odd per-layer
multipliers, and one distinct prime modulus per (layer, order, head). Given the demo's configuration
the ids are the demo's plus a per-head offset (tests/unit/test_engram_demo_parity.py pins them):
every head of every layer addresses one stacked logical table, so the ids are global rows that the
sharded table (``memory/``) can bucketize by owner without knowing the layout.

The ids depend only on token ids, so data loader workers compute them; the hasher is a plain
picklable object for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engram_train.engram.tokenizer_compression import num_canonical, table_fingerprint

HASH_SCHEME = "engram-ngram-hash-v1"
_LAYER_SEED_STRIDE = 10007
_INT64_MAX = np.iinfo(np.int64).max
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n below 3.3e24 (well past int64)."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(after: int, used: set[int]) -> int:
    """Smallest prime > ``after`` not in ``used`` (the demo's ``find_next_prime``)."""
    candidate = after + 1
    while not is_prime(candidate) or candidate in used:
        candidate += 1
    return candidate


class NgramHasher:
    """Maps raw token ids [B, T] to global table rows [B, T, num_layers, heads_total].

    Heads are order-major: head ``i * heads_per_order + h`` is head ``h`` of ``ngram_orders[i]``.
    Layers are in the order given. Row ``row_offsets[l, j] + (mix % head_sizes[l, j])`` belongs to
    head ``j`` of layer ``l``; ``layer_row_ranges[l]`` is the contiguous block of layer ``l``.

    ``pad_token_id`` is a raw id (normally ``<|endoftext|>``); its compressed id stands for the
    positions before the sequence start. ``rows_per_head`` is one target for every order or one per
    order (the demo's ``engram_vocab_size``). ``null_memory`` gives every head a single row, so
    every n-gram maps to its head's offset (a control without memory).
    """

    def __init__(
        self,
        compression_table: np.ndarray,
        ngram_orders: Sequence[int] = (2, 3),
        heads_per_order: int = 8,
        rows_per_head: int | Sequence[int] = 4099,
        layers: Sequence[int] = (1,),
        seed: int = 0,
        *,
        pad_token_id: int,
        null_memory: bool = False,
    ) -> None:
        table = np.array(compression_table, dtype=np.int64)
        if table.ndim != 1 or table.size == 0 or table.min() < 0:
            raise ValueError("compression_table must be a non-empty 1-D array of canonical ids >= 0")
        if not ngram_orders or min(ngram_orders) < 1 or len(set(ngram_orders)) != len(ngram_orders):
            raise ValueError(f"ngram_orders={list(ngram_orders)} must be distinct orders >= 1")
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers={list(layers)} must be a non-empty list of distinct layer indices")
        rows = [rows_per_head] * len(ngram_orders) if isinstance(rows_per_head, (int, np.integer)) else list(rows_per_head)
        if heads_per_order < 1 or len(rows) != len(ngram_orders) or min(rows) < 2:
            raise ValueError(
                f"need heads_per_order >= 1 and rows_per_head >= 2 (one int, or one per order of {list(ngram_orders)}), "
                f"got {heads_per_order} and {rows_per_head}"
            )
        if not 0 <= pad_token_id < table.size:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {table.size})")

        self.compression_table = table
        self.vocab_size = int(table.size)
        self.num_canonical = num_canonical(table)
        self.ngram_orders = tuple(int(n) for n in ngram_orders)
        self.max_order = max(self.ngram_orders)
        self.heads_per_order = int(heads_per_order)
        self.heads_total = len(self.ngram_orders) * self.heads_per_order
        self.rows_per_order = tuple(int(r) for r in rows)
        self.null_memory = bool(null_memory)
        self.layers = tuple(int(layer) for layer in layers)
        self.num_layers = len(self.layers)
        self.seed = int(seed)
        self.pad_token_id = int(pad_token_id)
        self.pad_id = int(table[pad_token_id])
        self.table_sha256 = table_fingerprint(table)

        self.multipliers = self._draw_multipliers()
        self.head_sizes = self._assign_primes()
        flat_sizes = self.head_sizes.reshape(-1)
        self.row_offsets = (np.cumsum(flat_sizes) - flat_sizes).reshape(self.head_sizes.shape)
        layer_starts = self.row_offsets[:, 0]
        layer_ends = layer_starts + self.head_sizes.sum(axis=1)
        self.layer_row_ranges = [(int(a), int(b)) for a, b in zip(layer_starts, layer_ends)]
        self.num_rows = int(layer_ends[-1])
        self._torch_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, engram_cfg: Any, compression_table: np.ndarray, pad_token_id: int) -> NgramHasher:
        """Build from ``EngramConfig`` (``engram_train.config``)."""
        return cls(
            compression_table,
            ngram_orders=list(engram_cfg.ngram_orders),
            heads_per_order=engram_cfg.heads_per_order,
            rows_per_head=engram_cfg.rows_per_head,
            layers=list(engram_cfg.layers),
            seed=engram_cfg.seed,
            pad_token_id=pad_token_id,
            null_memory=engram_cfg.null_memory,
        )

    def _draw_multipliers(self) -> np.ndarray:
        """[num_layers, max_order] odd int64 multipliers, one per n-gram position.

        Bounded so that (largest canonical id) * multiplier fits int64: the products stay
        non-negative and exact, which makes numpy and torch agree bit for bit.
        """
        half_bound = max(1, (_INT64_MAX // self.num_canonical) // 2)
        rows = []
        for layer in self.layers:
            rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * layer)
            r = rng.integers(low=0, high=half_bound, size=(self.max_order,), dtype=np.int64)
            rows.append(r * 2 + 1)
        return np.stack(rows)

    def _assign_primes(self) -> np.ndarray:
        """[num_layers, heads_total] distinct primes >= the order's row target, searched upward as the demo
        does (one set of used primes across every layer and order); all ones with ``null_memory``.

        Distinct moduli keep two heads from colliding on the same n-gram pairs.
        """
        if self.null_memory:
            return np.ones((self.num_layers, self.heads_total), dtype=np.int64)
        used: set[int] = set()
        sizes = np.empty((self.num_layers, self.heads_total), dtype=np.int64)
        for li in range(self.num_layers):
            for oi in range(len(self.ngram_orders)):
                start = self.rows_per_order[oi] - 1
                for h in range(self.heads_per_order):
                    start = next_unused_prime(start, used)
                    used.add(start)
                    sizes[li, oi * self.heads_per_order + h] = start
        return sizes

    def config_fingerprint(self) -> dict[str, Any]:
        """Everything that decides the row ids, JSON-serialisable; a table trained under one
        fingerprint is meaningless under another, so checkpoints store and compare it."""
        return {
            "scheme": HASH_SCHEME,
            "ngram_orders": list(self.ngram_orders),
            "heads_per_order": self.heads_per_order,
            "rows_per_head": list(self.rows_per_order),
            "null_memory": self.null_memory,
            "layers": list(self.layers),
            "seed": self.seed,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "num_canonical": self.num_canonical,
            "compression_table_sha256": self.table_sha256,
            "primes": self.head_sizes.tolist(),
            "multipliers": self.multipliers.tolist(),
            "num_rows": self.num_rows,
        }

    def _check_tokens(self, x: np.ndarray | torch.Tensor) -> None:
        if x.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(x.shape)}")
        if x.size if isinstance(x, np.ndarray) else x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]")

    def hash_numpy(self, tokens: np.ndarray, doc_boundary_token: int | None = None) -> np.ndarray:
        """Row ids [B, T, num_layers, heads_total] int64.

        With ``doc_boundary_token`` set, a position after that token sees the pad id in place of
        every token at or before it, so n-grams never span two documents.
        """
        x = np.asarray(tokens)
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got {x.dtype}")
        x = x.astype(np.int64, copy=False)
        self._check_tokens(x)
        batch, seq = x.shape
        xc = self.compression_table[x]
        segment = None
        if doc_boundary_token is not None:
            is_eos = (x == doc_boundary_token).astype(np.int64)
            segment = np.cumsum(is_eos, axis=1) - is_eos

        # mixes[n]: XOR over the n newest positions, i.e. the hash of the suffix n-gram of order n.
        mixes: dict[int, np.ndarray] = {}
        mix = np.zeros((batch, seq, self.num_layers), dtype=np.int64)
        for k in range(self.max_order):
            shifted = np.full_like(xc, self.pad_id)
            if k < seq:
                shifted[:, k:] = xc[:, : seq - k]
                if segment is not None and k:
                    crossed = segment[:, : seq - k] != segment[:, k:]
                    shifted[:, k:][crossed] = self.pad_id
            mix = mix ^ (shifted[..., None] * self.multipliers[:, k])
            mixes[k + 1] = mix

        parts = []
        for oi, n in enumerate(self.ngram_orders):
            cols = slice(oi * self.heads_per_order, (oi + 1) * self.heads_per_order)
            parts.append(mixes[n][..., None] % self.head_sizes[:, cols] + self.row_offsets[:, cols])
        return np.concatenate(parts, axis=-1)

    def _torch_table(self, device: torch.device) -> torch.Tensor:
        table = self._torch_tables.get(device)
        if table is None:
            table = torch.from_numpy(self.compression_table).to(device)
            self._torch_tables[device] = table
        return table

    def hash_torch(self, tokens: torch.Tensor, doc_boundary_token: int | None = None) -> torch.Tensor:
        """Same ids as ``hash_numpy``, computed with torch ops on ``tokens.device``."""
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        x = tokens.long()
        self._check_tokens(x)
        device = x.device
        batch, seq = x.shape
        xc = self._torch_table(device)[x]
        segment = None
        if doc_boundary_token is not None:
            is_eos = (x == doc_boundary_token).long()
            segment = torch.cumsum(is_eos, dim=1) - is_eos

        multipliers = torch.from_numpy(self.multipliers).to(device)
        head_sizes = torch.from_numpy(self.head_sizes).to(device)
        row_offsets = torch.from_numpy(self.row_offsets).to(device)

        mixes: dict[int, torch.Tensor] = {}
        mix = torch.zeros(batch, seq, self.num_layers, dtype=torch.int64, device=device)
        for k in range(self.max_order):
            shifted = torch.full_like(xc, self.pad_id)
            if k < seq:
                shifted[:, k:] = xc[:, : seq - k]
                if segment is not None and k:
                    crossed = segment[:, : seq - k] != segment[:, k:]
                    shifted[:, k:] = shifted[:, k:].masked_fill(crossed, self.pad_id)
            mix = mix ^ (shifted[..., None] * multipliers[:, k])
            mixes[k + 1] = mix

        parts = []
        for oi, n in enumerate(self.ngram_orders):
            cols = slice(oi * self.heads_per_order, (oi + 1) * self.heads_per_order)
            parts.append(torch.remainder(mixes[n][..., None], head_sizes[:, cols]) + row_offsets[:, cols])
        return torch.cat(parts, dim=-1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_torch_tables"] = {}
        return state
