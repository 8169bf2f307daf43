"""Megatron-core without Transformer Engine, as on a GPU node that has none: the MoE router must run.

megatron-core 0.16.1 binds ``moe_utils.te_general_gemm`` only when TE imports, yet its fp32 router GEMM reads
the name on every call. The CPU compatibility layer is not applied on a GPU, so the model build itself must bind
it. This recreates a GPU node's Megatron state on CPU (the name unbound after the CPU redirections) in a fresh
process, then builds the backbone and runs a forward and backward pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from engram_train.backbone import build_model
    from engram_train.backbone.cpu_compat import apply_cpu_compat
    from engram_train.config import Config, validate
    from engram_train.parallel import ParallelDims, destroy_process_groups, init_process_groups

    assert not moe_utils.HAVE_TE, "Transformer Engine imports here: this test is for the path without it"
    apply_cpu_compat()
    if hasattr(moe_utils, "te_general_gemm"):  # a GPU node applies no CPU redirection: the name stays unbound
        del moe_utils.te_general_gemm
    cfg = Config()
    cfg.engram.enabled = False  # the MoE backbone alone: the router is what is under test
    validate(cfg)
    assert cfg.model.num_experts > 0, "the default backbone has MoE layers (routed in fp32: backbone/model.py)"
    dims = ParallelDims.from_config(cfg)
    init_process_groups(dims)
    try:
        model, _ = build_model(cfg, vocab_size=256, dims=dims)
        ids = torch.randint(0, 256, (2, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0))
        loss = model(ids[:, :-1], ids[:, 1:]).float().mean()
        loss.backward()
        router = [p for n, p in model.named_parameters() if n.endswith("router.weight")]
        assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
        print("router ran", float(loss))
    finally:
        destroy_process_groups()
""")


def test_the_moe_router_runs_without_transformer_engine_when_no_cpu_redirection_bound_its_gemm():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "router ran" in result.stdout, result.stderr[-3000:]
