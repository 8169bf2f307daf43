"""The canonical init's weight names: one per weight whatever the kernels and the EP layout."""

from __future__ import annotations

import pytest

from engram_train.backbone.init import _global_name, _local_expert_index

LAYER = "decoder.layers.1.mlp.experts"


@pytest.mark.parametrize("fc", ["linear_fc1", "linear_fc2"])
@pytest.mark.parametrize("num_local, ep_rank, local", [(4, 0, 0), (4, 1, 3), (2, 3, 1)])
def test_grouped_and_sequential_experts_get_the_same_global_name(fc, num_local, ep_rank, local):
    # Megatron's SequentialMLP and Transformer Engine's TEGroupedMLP name local expert k differently
    # (megatron-core 0.16: ``local_experts.{k}.linear_fc1.weight`` vs ``linear_fc1.weight{k}``).
    sequential = f"{LAYER}.local_experts.{local}.{fc}.weight"
    grouped = f"{LAYER}.{fc}.weight{local}"
    assert _local_expert_index(sequential) == _local_expert_index(grouped) == local
    expected = f"{LAYER}.experts.{ep_rank * num_local + local}.{fc}.weight"
    assert _global_name(sequential, num_local, ep_rank) == _global_name(grouped, num_local, ep_rank) == expected


def test_dense_weights_keep_their_names():
    for name in ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.layers.0.mlp.shared_experts.linear_fc2.weight", "decoder.layers.0.mlp.router.weight"):
        assert _local_expert_index(name) is None and _global_name(name, 4, 1) == name
