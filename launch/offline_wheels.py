"""Collect wheels for a GPU node that cannot reach a package index and already has a CUDA PyTorch.

    python launch/offline_wheels.py --out wheelhouse --python-version 3.12 [--have node-pip-freeze.txt]
    launch/gpu_check.sh --wheelhouse wheelhouse          # on the node: installs what it lacks, then the checks

Compute nodes often have no internet and a site-provided PyTorch built for their CUDA, which ``pip install .``
would replace with this project's pinned build. This walks engram-train's requirements (and pytest's, which the
checks run) through the environment it runs in (the venv ``make setup`` built and the tests passed in), takes
each installed version exactly, drops torch and its CUDA/Triton companions and whatever the node already has
(``--have``: its ``pip freeze`` or one name per line; only saves space, gpu_check.sh skips what the node has),
and fetches each of the rest for the node's Python and platform. A package that publishes no wheel (antlr4,
deepspeed) is built here, and refused unless the result is pure Python. One ``pip download`` of the project
instead would resolve torch and its CUDA wheels (gigabytes) and stop at the first package without a wheel.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: Where the walk starts: the trainer and the test runner of the GPU checks.
ROOTS = ("engram-train", "pytest", "pytest-timeout")
#: The node's own PyTorch stack: never shipped (names as packaging's canonicalize_name gives them, PEP 503).
NODE_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def installed_closure(roots: tuple[str, ...], version=metadata.version, requires=metadata.requires) -> dict[str, str]:
    """{normalised name: installed version} of ``roots`` and everything they require here (markers evaluated for
    this interpreter, no extras), stopping at the node's PyTorch stack. ``version``/``requires`` as in
    importlib.metadata (tests pass a fake environment)."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or NODE_STACK.match(name):
            continue
        found[name] = version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0
        for line in requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def names_on_node(path: Path) -> set[str]:
    """Names in a node's ``pip freeze`` / ``pip list`` output, or one per line."""
    names = set()
    for line in path.read_text().splitlines():
        token = re.split(r"[=<>@ ;\t]", line.strip(), maxsplit=1)[0]
        if token and not token.startswith(("#", "-")) and token.lower() != "package":
            names.add(canonicalize_name(token))
    return names


def packages_to_ship(closure: dict[str, str], have: set[str]) -> dict[str, str]:
    """{name: version} of the closure less this project (it runs from the checkout) and what the node has."""
    return {name: version for name, version in sorted(closure.items()) if name != "engram-train" and name not in have}


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

    if args.out.exists() and any(args.out.glob("*.whl")):
        raise SystemExit(f"offline_wheels: {args.out} already holds wheels (an earlier run's versions would "
                         f"mix with this one's); pass an empty or new --out")
    wanted = packages_to_ship(installed_closure(ROOTS), names_on_node(args.have) if args.have else set())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, version in wanted.items():
        print(f"{name}=={version}: {fetch(name, version, args.out, args.python_version, args.platform or PLATFORMS)}")
    size = sum(wheel.stat().st_size for wheel in args.out.glob("*.whl"))
    print(f"{len(wanted)} packages, {size / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
