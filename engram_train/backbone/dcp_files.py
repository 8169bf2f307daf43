"""The backbone's checkpoint files (a step folder's ``backbone/``): what they hold, a layout-free sharded state
dict of the model and its Adam moments, and how they are read without running code.

Megatron's ``sharded_state_dict`` names every tensor by its global key, shape and this rank's offset;
Megatron's optimizer helpers attach the same sharding to each Adam moment. ``dist_checkpointing`` then
stores it with ``torch.distributed.checkpoint``, and loading into a model of another TP/EP layout reads
exactly the slices the new layout owns. Engram blocks are replicated on every rank and saved once.

Loading never runs code from the files: torch.distributed.checkpoint unpickles its ``.metadata`` file
without restriction and its planner loads byte items with ``weights_only=False``, so during a load the
metadata goes through an unpickler that admits only the checkpoint metadata types and every ``torch.load``
(Megatron's ``common.pt``, byte items) is ``weights_only``.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import pickle
import types
from pathlib import Path

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.utils import make_sharded_tensor_for_checkpoint


def _model_sharded_state_dict(model) -> dict:
    state = model.gpt.sharded_state_dict(prefix="gpt.")
    for name, tensor in model.engram_blocks.state_dict(prefix="engram_blocks.", keep_vars=True).items():
        state[name] = make_sharded_tensor_for_checkpoint(tensor, name)
    return state


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter zero moments so a checkpoint's moments have tensors to load into."""
    for param in _optimizer_params(optimizer):
        state = optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)


def adam_sharded_state_dict(optimizer: torch.optim.Optimizer, model_state: dict, *, loading: bool,
                            model_params: list[torch.nn.Parameter] | None = None) -> dict:
    """torch AdamW's state with each moment sharded like its parameter in ``model_state``.

    ``model_params``: the model parameter each optimizer parameter stands for, in optimizer order, where
    AdamW steps fp32 main copies of bf16 parameters; each main copy is then saved (and loaded) beside its
    moments as ``fp32_param``, so a resumed bf16 run continues from the exact fp32 weights.
    """
    if loading:
        init_adam_state(optimizer)
    optim_state = optimizer.state_dict()
    steps = {float(s["step"]) for s in optim_state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW parameters disagree on the step count ({sorted(steps)}); cannot checkpoint")
    mains = _optimizer_params(optimizer)
    model_params = mains if model_params is None else model_params
    for index, (param, main) in enumerate(zip(model_params, mains)):
        if main is not param:
            optim_state["state"].setdefault(index, {})["fp32_param"] = main.detach()
    id_map = get_param_id_to_sharded_param_map(model_state, model_params)
    optim_state_to_sharding_state(optim_state, id_map, exclude_keys=("step",))
    optim_state["common_step"] = steps.pop() if steps else 0.0
    return optim_state


def load_adam_state_dict(optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    step = float(optim_state.pop("common_step"))
    mains = _optimizer_params(optimizer)
    for index, param_state in optim_state["state"].items():
        param_state["step"] = torch.tensor(step, dtype=torch.float32)
        if "fp32_param" in param_state:
            with torch.no_grad():
                mains[index].copy_(param_state.pop("fp32_param"))
    optimizer.load_state_dict(optim_state)


def backbone_sharded_state_dict(model, optimizer, *, loading: bool = False) -> dict:
    """``optimizer`` is ``optim.TorchAdamW`` or ``optim.MegatronDistributedAdam``; each shards its own state."""
    model_state = _model_sharded_state_dict(model)
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, loading=loading)}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to load something other than checkpoint data (a planted payload, or foreign data)."""


#: Modules whose classes make up DCP metadata (dataclasses and enums), and the few torch values it names.
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"}
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if module in _METADATA_MODULES or (module, name) in _METADATA_NAMES or module == "torch":
            obj = getattr(importlib.import_module(module), name, None)
        admitted = (
            (module, name) in _METADATA_NAMES
            or (module in _METADATA_MODULES and isinstance(obj, type) and obj.__module__ == module
                and (hasattr(obj, "__dataclass_fields__") or issubclass(obj, enum.Enum)))
            or (module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)))
        )
        if not admitted:
            raise UnsafeCheckpointError(f"it asks to load {module}.{name}, which is not a checkpoint metadata type; "
                                        "refused (the file is damaged or was planted)")
        return obj


def read_dcp_metadata(path: Path):
    """A DCP ``.metadata`` file, unpickled with only the checkpoint metadata types admitted."""
    with open(path, "rb") as f:
        return _MetadataUnpickler(f).load()


_torch_load = torch.load


def _weights_only_load(*args, **kwargs):
    kwargs["weights_only"] = True
    return _torch_load(*args, **kwargs)


@contextlib.contextmanager
def loading_without_code():
    """Within: DCP reads ``.metadata`` through ``_MetadataUnpickler`` and every ``torch.load`` is weights_only."""
    restricted = types.SimpleNamespace(load=lambda f: _MetadataUnpickler(f).load(), dump=pickle.dump,
                                       dumps=pickle.dumps, loads=pickle.loads)
    saved_pickle = dcp_filesystem.pickle
    dcp_filesystem.pickle, torch.load = restricted, _weights_only_load
    try:
        yield
    finally:
        dcp_filesystem.pickle, torch.load = saved_pickle, _torch_load


def load_backbone(model, optimizer, directory: Path) -> None:
    """Load the slices this rank owns, whatever layout wrote the checkpoint (no code from the files runs)."""
    with loading_without_code():
        loaded = dist_checkpointing.load(backbone_sharded_state_dict(model, optimizer, loading=True), str(directory))
    model.load_state_dict(loaded["model"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
