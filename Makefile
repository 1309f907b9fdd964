# Two commands for a new user: `make train` and `make test`. Both create .venv on first use.
# CPU-only machines get the CPU build of torch; GPU users: see README ("GPU").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
ARGS ?=

.PHONY: train test lint format clean-venv gpu-bundle

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python -m recsys_compress.train $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)

# What scripts/gpu_bench.sh needs on a CUDA machine with torch + lightning but no network: the
# pure-Python wheels our code adds (Python 3.12) and the ML-100K ratings file, in .gpu/ (ignored).
GPU_WHEELS ?= hydra-core==1.3.8 omegaconf==2.3.0 platformdirs==4.14.9
gpu-bundle: $(BIN)/.installed
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache/ml100k
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .gpu/wheels $(GPU_WHEELS)
	$(BIN)/python -m pip wheel --quiet --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
	$(BIN)/python -c "from recsys_compress.data.sources import default_cache_dir as d, \
		load_movielens as m; m('ml100k'); print(d() / 'ml100k')" | tail -1 | \
		xargs -I{} cp {}/ml-100k.inter .gpu/cache/ml100k/
	du -sh .gpu
