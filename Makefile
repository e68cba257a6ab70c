# falqon_dist — set up once, then run. Every target is idempotent: setup is skipped when .venv is
# current (its stamp is newer than pyproject.toml).
#
#   make demo   set up .venv and run the embedded default end to end (tiny model, built-in data)
#   make test   set up .venv and run the test suite (unit, 2-rank gloo, launcher end-to-end)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# torch is pinned for CPU installs: a bare "torch" requirement pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test wheels clean

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

# Wheels for the lent GPU machine (no registry there): DeepSpeed, Hydra, pydantic, bitsandbytes, pytest,
# at this venv's versions, within its 64 MiB carry limit. Then: OUT=... bash launch/gpu_check.sh there.
wheels: setup
	$(PY) launch/make_wheels.py --out wheels

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
