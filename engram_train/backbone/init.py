"""Layout-independent initialisation of the Megatron backbone.

Megatron draws weights from the process RNG in construction order, so a rank holding experts 4-7 at
EP=2 draws what expert 0 gets at EP=1. To make every TP/EP layout start from the same model (the
premise of the parity tests and of resharding a checkpoint), each weight is redrawn here from its own
generator, keyed by the seed and the weight's global name; the rank keeps its slice of that full tensor.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state

_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
# Transformer Engine's grouped experts (TEGroupedMLP) hold local expert k as ``experts.linear_fc1.weight{k}``.
_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")
# Megatron's legacy GroupedMLP holds all local experts in ``experts.weight1`` [hidden, experts x fc1 out] and
# ``experts.weight2`` [experts x fc2 in, hidden], expert k being ``weight1.view(experts, hidden, -1)[k]`` (its fc1
# transposed) and ``weight2.view(experts, -1, hidden)[k]``, as its checkpoint format reads them.
_LEGACY_GROUPED = re.compile(r"\.experts\.weight([12])$")
_SCALED_OUTPUT = ("linear_proj.weight", "linear_fc2.weight")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _local_expert_index(name: str) -> int | None:
    match = _LOCAL_EXPERT.search(name) or _GROUPED_EXPERT.search(name)
    return None if match is None else int(match.group(1) if match.re is _LOCAL_EXPERT else match.group(2))


def _global_name(name: str, num_local_experts: int, ep_rank: int) -> str:
    """One name per weight whatever the layout: the expert's global index (EP) in the same form for Megatron's
    sequential experts and TE's grouped ones, so both start from the same model."""
    if match := _LOCAL_EXPERT.search(name):
        global_index = ep_rank * num_local_experts + int(match.group(1))
        return name[: match.start()] + f".experts.{global_index}." + name[match.end():]
    if match := _GROUPED_EXPERT.search(name):
        global_index = ep_rank * num_local_experts + int(match.group(2))
        return name[: match.start()] + f".experts.experts.{global_index}.{match.group(1)}.weight"
    return name


def _draw(seed: int, name: str, shape: list[int], *, std: float, num_layers: int) -> torch.Tensor:
    """The full weight called ``name``: N(0, std), output projections std/sqrt(2L), as Megatron does."""
    scale = std / math.sqrt(2.0 * num_layers) if name.endswith(_SCALED_OUTPUT) else std
    return torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32) * scale


def _slice(full: torch.Tensor, dim: int, rank: int, size: int, glu: bool) -> torch.Tensor:
    """This TP rank's part of ``full`` along ``dim``."""
    if size == 1:
        return full
    if glu:
        # A gated fc1 holds [gate; up]; each TP rank keeps its slice of both halves.
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


@torch.no_grad()
def canonical_init_(gpt: torch.nn.Module, *, seed: int, std: float, num_layers: int, gated_linear_unit: bool) -> None:
    """Redraw every matrix of ``gpt`` as N(0, std) (output projections std/sqrt(2L), as Megatron does)."""
    tp_rank, tp_size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_local_experts = max(
        (index + 1 for n, _ in gpt.named_parameters() if (index := _local_expert_index(n)) is not None), default=0
    )
    grouped = {f"{name}.": module for name, module in gpt.named_modules() if type(module).__name__ == "GroupedMLP"}
    for name, param in gpt.named_parameters():
        if param.dim() < 2:
            continue  # norm gains stay at their constant init
        if match := _LEGACY_GROUPED.search(name):
            module = grouped[name[: match.start()] + ".experts."]
            _init_legacy_grouped_(param, name[: match.start()] + ".experts", int(match.group(1)),
                                  module.num_local_experts, ep_rank=ep_rank, rank=etp_rank, size=etp_size, seed=seed,
                                  std=std, num_layers=num_layers, glu=gated_linear_unit)
            continue
        is_expert = _local_expert_index(name) is not None
        canonical = _global_name(name, num_local_experts, ep_rank)
        rank, size = (etp_rank, etp_size) if is_expert else (tp_rank, tp_size)
        full_shape = list(param.shape)
        if size > 1 and getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= size
        full = _draw(seed, canonical, full_shape, std=std, num_layers=num_layers)
        glu = gated_linear_unit and canonical.endswith("linear_fc1.weight")
        if getattr(param, "tensor_model_parallel", False):
            full = _slice(full, param.partition_dim, rank, size, glu)
        param.copy_(full.to(param.dtype))


def _init_legacy_grouped_(param: torch.nn.Parameter, prefix: str, which: int, num_local_experts: int, *, ep_rank: int,
                          rank: int, size: int, seed: int, std: float, num_layers: int, glu: bool) -> None:
    """Each local expert of a GroupedMLP weight from the same generator as its SequentialMLP twin (``which`` 1: fc1,
    column-parallel, stored transposed; 2: fc2, row-parallel, stored transposed), sliced for this expert-TP rank."""
    hidden = param.shape[0] if which == 1 else param.shape[1]
    experts = param.view(num_local_experts, hidden, -1) if which == 1 else param.view(num_local_experts, -1, hidden)
    for local, expert in enumerate(experts):
        name = f"{prefix}.experts.{ep_rank * num_local_experts + local}.linear_fc{which}.weight"
        if which == 1:  # column-parallel [out, hidden], out split over expert-TP ranks
            full = _draw(seed, name, [expert.shape[1] * size, hidden], std=std, num_layers=num_layers)
            mine = _slice(full, 0, rank, size, glu)
        else:  # row-parallel [hidden, in], in split
            full = _draw(seed, name, [hidden, expert.shape[0] * size], std=std, num_layers=num_layers)
            mine = _slice(full, 1, rank, size, False)
        expert.copy_(mine.t().to(param.dtype))
