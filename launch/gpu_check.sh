#!/usr/bin/env bash
# The GPU checks, in one command, on a GPU node: tests/integration/test_gpu.py, then bench/gpu.py.
#
#   launch/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--peak-tflops F] [--test-timeout S] [--dry-run]
#                       [-- pytest args ...]
#
#   --wheelhouse DIR  install the wheels of packages the node lacks first, without an index and without touching
#                     its own packages (into a temporary folder put first on PYTHONPATH); DIR from
#                     launch/offline_wheels.py. For a node that has a CUDA PyTorch but cannot reach a package
#                     index. Without it the Python on PATH (or $PYTHON) must already hold engram-train's
#                     dependencies.
#   --out DIR         logs and results: test_gpu.log, test_gpu.xml (JUnit), bench_gpu.log, gpu.json, env.txt
#                     (default outputs/gpu_check/<UTC time>)
#   --peak-tflops F   dense bf16 peak of one GPU, for bench/gpu.py's MFU (default 989: H100/H200 SXM)
#   --test-timeout S  interrupt the tests (SIGINT: pytest still writes its report) after S seconds, so the bench
#                     gets its turn within a short lease; exit status 124 then
#   --dry-run         run on a machine without a GPU: the tests skip and the bench runs its small CPU
#                     configuration. Checks the kit (install, imports, data) before GPU time is spent on it.
#
# Both steps run even if the first fails; the exit status is the first failure's (2: no GPU, no --dry-run;
# 124: the tests ran past --test-timeout).
# The trainer runs from this checkout (PYTHONPATH), so nothing is pip-installed into the node's environment.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "launch/gpu_check.sh: $*" >&2; exit 2; }

WHEELHOUSE="" OUT_DIR="" PEAK=989 TEST_TIMEOUT="" DRY_RUN=0
while (($#)); do
    case "$1" in
        --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a folder}"; shift 2 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --peak-tflops) PEAK="${2:?--peak-tflops needs a number}"; shift 2 ;;
        --test-timeout) TEST_TIMEOUT="${2:?--test-timeout needs seconds}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-$REPO/outputs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || die "cannot create --out $OUT_DIR"

SITE=""
if [[ -n "$WHEELHOUSE" ]]; then
    compgen -G "$WHEELHOUSE/*.whl" >/dev/null || die "--wheelhouse $WHEELHOUSE holds no .whl files; build it with launch/offline_wheels.py"
    # Only what the node lacks: the folder goes first on PYTHONPATH, so a wheel of a package the node has (numpy,
    # sympy, ...) would shadow the version its PyTorch was built and tested with.
    missing="$("$PYTHON" - "$WHEELHOUSE" <<'EOF'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
    )" || die "$PYTHON cannot read its installed packages"
    MISSING=()
    [[ -z "$missing" ]] || mapfile -t MISSING <<<"$missing"
    echo "--wheelhouse: installing ${#MISSING[@]} of $(compgen -G "$WHEELHOUSE/*.whl" | wc -l) wheels (the node has the rest)"
    SITE="$(mktemp -d -t engram-site.XXXXXX)" || die "mktemp failed"
    trap 'rm -rf "$SITE"' EXIT
    if ((${#MISSING[@]})); then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${MISSING[@]}" \
            || die "installing $WHEELHOUSE failed (see pip's message above)"
    fi
fi
export PYTHONPATH="${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE="${WANDB_MODE:-offline}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(bash "$REPO/launch/torchrun.sh" --print-extensions-dir)}"
cd "$REPO"

"$PYTHON" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF' || { cat "$OUT_DIR/env.txt"; die "$PYTHON cannot import torch (above)"; }
import importlib, platform, torch
first_line = lambda error: str(error).splitlines()[0] if str(error) else ""
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("megatron.core", "hydra", "omegaconf", "webdataset", "wandb", "tokenizers", "deepspeed", "transformer_engine"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # transformer_engine is optional; the others make the checks below fail
        print(name, "NOT IMPORTABLE:", type(error).__name__, first_line(error))
if torch.cuda.is_available():  # Megatron's grouped experts torch.compile their activation (Inductor: Triton + a C compiler)
    import time
    start = time.perf_counter()
    try:
        torch.compile(lambda x: torch.nn.functional.silu(x) * x)(torch.ones(64, device="cuda", dtype=torch.bfloat16))
        print(f"torch.compile on cuda: ok ({time.perf_counter() - start:.1f} s)")
    except Exception as error:  # reported, not fatal: the tests show what it breaks
        print("torch.compile on cuda: FAILED:", type(error).__name__, first_line(error))
EOF
cat "$OUT_DIR/env.txt"
grep -q "NOT IMPORTABLE" <(grep -v "^transformer_engine" "$OUT_DIR/env.txt") \
    && die "a dependency does not import (see $OUT_DIR/env.txt): pass --wheelhouse from launch/offline_wheels.py"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    ((DRY_RUN)) || die "torch sees no CUDA GPU here; run this on a GPU node (or --dry-run to check the kit)"
fi

LIMIT=()
[[ -z "$TEST_TIMEOUT" ]] || LIMIT=(timeout --signal=INT --kill-after=30 "$TEST_TIMEOUT")
echo "== tests/integration/test_gpu.py -> $OUT_DIR/test_gpu.log"
"${LIMIT[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py \
    --junitxml "$OUT_DIR/test_gpu.xml" "$@" 2>&1 | tee "$OUT_DIR/test_gpu.log"
status=${PIPESTATUS[0]}
((status != 124)) || echo "== the tests ran past --test-timeout ${TEST_TIMEOUT} s and were interrupted (their" \
    "report above is partial); the bench runs now" | tee -a "$OUT_DIR/test_gpu.log"
echo "== bench/gpu.py -> $OUT_DIR/bench_gpu.log"
"$PYTHON" bench/gpu.py --peak-tflops "$PEAK" --out "$OUT_DIR/gpu.json" 2>&1 | tee "$OUT_DIR/bench_gpu.log"
bench_status=$?
exit $((status ? status : bench_status))
