"""The backbone optimizer choice: what runs on CPU is tested here for real; Megatron's DistributedOptimizer
itself needs CUDA (``tests/gpu``), so on CPU only its configuration is checked against torch AdamW's."""

import pytest
import torch

from engram_train.config import Config, ConfigError, validate
from tests.unit.test_config import compose_config


def test_distributed_optimizer_needs_the_megatron_ddp_buffers():
    with pytest.raises(ConfigError) as error:
        compose_config("optim.distributed=true", "parallel.grad_sync=coalesced")
    assert str(error.value).startswith("parallel.grad_sync='coalesced' is invalid: must be megatron_ddp or auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_distributed_optimizer_without_a_gpu_is_refused_before_the_model_is_built():
    from engram_train.backbone import build_model

    cfg = Config()
    cfg.optim.distributed = True
    validate(cfg)
    with pytest.raises(ConfigError, match=r"optim.distributed=true needs a GPU.*Set optim.distributed=false"):
        build_model(cfg, vocab_size=256, dims=None)


def _decay_groups() -> dict:
    from megatron.core.optimizer import _get_param_groups

    from engram_train.backbone import build_model
    from engram_train.optim import TorchAdamW, megatron_decay_overrides, megatron_optimizer_config
    from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups

    cfg = Config()
    cfg.parallel.grad_sync = "megatron_ddp"
    dims = ParallelDims.from_config(cfg)
    init_process_groups(dims)
    try:
        model, grad_sync = build_model(cfg, vocab_size=256, dims=dims)
        names = {id(param): name for name, param in model.named_parameters()}
        torch_groups = TorchAdamW(model, cfg.optim, dims).optimizer.param_groups
        megatron_groups = _get_param_groups([grad_sync.ddp], megatron_optimizer_config(cfg.optim),
                                            megatron_decay_overrides())

        def named(groups, decay: bool, key: str) -> list[str]:
            return sorted(names[id(p)] for g in groups if (g[key] > 0) == decay for p in g["params"])

        return {
            "torch_decay": named(torch_groups, True, "weight_decay"),
            "torch_no_decay": named(torch_groups, False, "weight_decay"),
            "megatron_decay": named(megatron_groups, True, "wd_mult"),
            "megatron_no_decay": named(megatron_groups, False, "wd_mult"),
        }
    finally:
        destroy_process_groups()


def test_megatron_optimizer_decays_exactly_the_parameters_torch_adamw_decays():
    """Megatron's default override would decay conv kernels and skip only 1-D tensors; ours must match
    torch AdamW's grouping parameter for parameter (names seen through Megatron's DDP wrapper)."""
    groups = _decay_groups()  # a one-process group, in this process
    assert groups["megatron_decay"] == groups["torch_decay"]
    assert groups["megatron_no_decay"] == groups["torch_no_decay"]
    assert any("conv" in name for name in groups["torch_no_decay"])
    assert any("experts" in name for name in groups["torch_decay"])
