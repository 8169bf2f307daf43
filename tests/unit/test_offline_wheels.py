"""launch/offline_wheels.py: which packages a GPU node without an index is sent. Downloading is pip's job and
needs an index, so only the choice is tested here; the whole kit was checked by hand (README, GPU checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("offline_wheels", REPO / "launch" / "offline_wheels.py")
offline_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_wheels)

FREEZE = """\
# Editable Git install with no remote (engram-train==0.1.0)
-e /work/main
antlr4-python3-runtime==4.9.3
hydra-core==1.3.8
megatron-core==0.16.1
nvidia-nccl-cu13==2.28.3
numpy==2.4.6
pyflakes==4.1.0
Pydantic_Core==2.50.5
torch==2.13.0+cpu
triton==3.6.0
wandb==0.31.0
"""


def test_the_node_gets_the_exact_pins_it_lacks_and_never_torch_or_its_cuda_stack(tmp_path):
    # the node's list as `pip list` prints it: a header, a rule, then name and version columns
    have = tmp_path / "have.txt"
    have.write_text("Package     Version\n----------- -------\nnumpy       2.5.2\nWandB 0.30.0\n")
    shipped = offline_wheels.shipped(FREEZE, offline_wheels.names_on_node(have))
    assert shipped == {"antlr4-python3-runtime": "4.9.3", "hydra-core": "1.3.8", "megatron-core": "0.16.1",
                       "pydantic-core": "2.50.5"}


def test_a_node_list_in_freeze_form_or_bare_names_is_read_alike(tmp_path):
    freeze_form, names = tmp_path / "freeze.txt", tmp_path / "names.txt"
    freeze_form.write_text("hydra_core==1.3.7\nmegatron-core @ file:///wheels/megatron_core.whl\n")
    names.write_text("Hydra.Core\nmegatron-core\n")
    assert offline_wheels.names_on_node(freeze_form) == offline_wheels.names_on_node(names) == {"hydra-core",
                                                                                                "megatron-core"}
