# engram-train: every entry point a user or CI needs. A fresh machine needs only `make train` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds its CPU Adam kernel once (~45 s) with -march=native: one cache per CPU model,
# .cache/torch_extensions/<arch>-<march>-<hash>, the one launch/torchrun.sh uses (a TORCH_EXTENSIONS_DIR set wins).
export TORCH_EXTENSIONS_DIR := $(shell bash $(CURDIR)/launch/torchrun.sh --print-extensions-dir)
export WANDB_MODE ?= offline
export PYTHONWARNINGS ?= ignore
DATA ?= data/debian-docs
DEBIAN_DOCS := linux-doc-6.1 perl-doc python3.11-doc vim-runtime git-doc dict-gcide dict-wn fortunes postgresql-doc-15
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup corpus data train test test-fast bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same pip call: a bare requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test]'
	# Build DeepSpeed's CPU Adam (the table's optimizer) now, into the cache, not inside the first run or test.
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)"
	touch $@

setup: $(VENV)/.installed

# The Debian documentation corpus (shared/notes/data_sources.md); without apt the Python stdlib is the fallback.
corpus:
	@if command -v apt-get >/dev/null && ls /usr/share/doc/postgresql-doc-15 >/dev/null 2>&1 && ls -d /usr/share/doc/linux-doc-* >/dev/null 2>&1; then \
		echo "Debian documentation corpus already installed"; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_DOCS) >/dev/null \
		|| echo "apt-get failed: data preparation falls back to the Python stdlib source"; \
	else echo "no apt-get: data preparation falls back to the Python stdlib source"; fi

data: setup corpus
	$(PY) -m data_pipelines.prepare --out $(DATA)

train: data
	$(PY) -m engram_train.train data.path=$(DATA)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup data
	mkdir -p bench/results
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# tests/integration/test_gpu.py then bench/gpu.py on this machine's GPU (launch/gpu_check.sh: logs and gpu.json
# under outputs/gpu_check/); refuses to run without one.
gpu-check: setup
	PYTHON=$(PY) bash launch/gpu_check.sh

clean:
	rm -rf outputs .pytest_cache
