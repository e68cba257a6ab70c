# falqon_dist — set up once, then run. Every target is idempotent: setup is skipped when .venv is
# current (its stamp is newer than pyproject.toml).
#
#   make demo   set up .venv and run the embedded default end to end (tiny model, built-in data)
#   make test   set up .venv and run the test suite (unit, 2-rank gloo, launcher end-to-end)
#
# While working on the code:
#
#   make test-fast   the unit tests not marked slow (about 1.5 min on 2 CPU cores)
#   make lint        ruff check, ruff format --check and mypy (configured in pyproject.toml)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# torch is pinned for CPU installs: a bare "torch" requirement pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-fast lint wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

# 2 ranks on this machine (CPU: gloo; GPUs: nccl), ZeRO-3, FALQON on the embedded tiny model.
# Extra Hydra overrides: make demo ARGS="train.max_steps=100 method=lora"
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/train.py $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(ARGS)

# tests/conftest.py marks the tiers (unit, dist, e2e, gpu) by directory, and the slow unit tests
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "unit and not slow" $(ARGS)

# all three run, so one pass reports everything; fails if any of them does
lint: setup
	@status=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "ruff format --check ."; $(VENV)/bin/ruff format --check . || status=1; \
	echo "mypy (falqon_dist)"; $(VENV)/bin/mypy || status=1; \
	exit $$status

# Wheels for an offline GPU machine (no package registry there): DeepSpeed, Hydra, pydantic,
# bitsandbytes, pytest, at this venv's versions (under 64 MiB in all). Then, on that machine:
# OUT=... bash launch/gpu_check.sh
wheels: setup
	$(PY) launch/make_wheels.py --out wheels

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
