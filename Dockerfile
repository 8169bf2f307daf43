# engram-train on CPU: `make train` (corpus, data, tiny Engram-MoE run) is the default command.
#
#   docker build -t engram-train .
#   docker run --rm -v "$PWD/outputs:/opt/engram-train/outputs" engram-train
#   docker run --rm engram-train .venv/bin/python -m engram_train.train engram=off experiment.total_tokens=2e5
#
# Build arguments:
#   BASE_IMAGE       python:3.11-slim (default). The package needs Python 3.11 (pyproject.toml).
#   TORCH_INDEX_URL  an extra package index to take torch==2.13.0 from (no default: pip's configured index).
#                    Pass the index of the torch build you want (a CPU build on CPU machines: a plain
#                    torch==2.13.0 from a general index may be the multi-GB CUDA build). For NVIDIA GPUs take the
#                    CUDA build and run with `docker run --gpus all`; or start from an NVIDIA PyTorch image
#                    (BASE_IMAGE=<an NVIDIA PyTorch image with Python 3.11>), keeping in mind that torch is pinned
#                    to 2.13.0 and pip replaces a different build.
#   wheels/          optional folder in the build context: a torch wheel there (torch-2.13.0+cpu-...whl) is
#                    installed instead of downloading one (offline builds; the integration test does this).
# No `# syntax=` line: the classic builder needs nothing from Docker Hub beyond the base image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    DEBIAN_FRONTEND=noninteractive

# make runs the entry points; g++ JIT-builds DeepSpeed's CPU Adam kernel on first use (Makefile: TORCH_EXTENSIONS_DIR).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/engram-train
# The venv is where the Makefile expects it (.venv), so `make train` / `make test` use it as is.
ENV VIRTUAL_ENV=/opt/engram-train/.venv PATH=/opt/engram-train/.venv/bin:$PATH
RUN python3.11 -m venv .venv

# torch first and alone, so the dependency layers below stay cached and never pull a CUDA build.
# pyproject.toml is listed so that the COPY has a source when wheels/ does not exist.
COPY pyproject.toml wheels* /tmp/wheels/
RUN set -e; \
    if ls /tmp/wheels/torch-2.13.0*.whl >/dev/null 2>&1; then \
        pip install /tmp/wheels/torch-2.13.0*.whl; \
    else \
        pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch==2.13.0; \
    fi; \
    rm -rf /tmp/wheels

# The remaining dependencies, read from pyproject.toml (with the test extra, so `make test` runs here too).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
# --no-deps: everything is installed above; touching .installed tells the Makefile that setup is done.
RUN pip install --no-deps -e . && touch .venv/.installed

CMD ["make", "train"]
