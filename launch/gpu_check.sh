#!/usr/bin/env bash
# One-command check of falqon_dist on a CUDA machine, sized to end within BUDGET_S; $OUT receives
# two files.
#
#   OUT=/some/dir bash launch/gpu_check.sh    # writes summary.txt and results.tar.gz into $OUT
#   bash launch/gpu_check.sh                  # writes runs/gpu_check/<timestamp>/
#
# $OUT receives exactly two files, both rewritten after every step, so a time-out still returns
# everything that finished:
#   summary.txt       PASS/FAIL/SKIP per step with its time, then the headline tables
#   results.tar.gz    every step's log and output folder (bench JSON/markdown/PNG, run dirs, junit)
#
# Steps, in this order: the verdict first (tests, then the real trainer), the numbers after (each
# step runs even when an earlier one failed; a step the budget no longer covers is reported SKIP):
#   env          GPU, versions, which optional packages import, whether fp8.backend=te can run
#   wheels       install from $WHEELS (no registry on the device) what does not import, or is too old
#                (typing-extensions >= 4.16 for pydantic): DeepSpeed, Hydra/OmegaConf, pydantic,
#                bitsandbytes, pytest ... (fill it here: make wheels)
#   pytest       the GPU test tier (the Triton merge kernel against the CPU reference included) and
#                the FP8/layer/merge unit tests, on this GPU
#   smoke_z0     launch/train.py, 1 GPU over NCCL, ZeRO-0, 3 steps, export on; then launch/eval.py
#   smoke_z3     the same under ZeRO-3
#   bench_merge  benchmarks/bench_merge.py on cuda: 32 layers 4096x4096, rank 64: untiled, torch
#                tiles, Triton kernel, paper merge; the merge in parts (bytes per element)
#   bench_layer  benchmarks/bench_layer.py on cuda: 4096x4096 and 4096x11008, 4096 and 16384 tokens,
#                rank 64, every method (FALQON default and paper merge), per-GEMM TFLOP/s, step split
#   bench_model  benchmarks/bench_model.py: two Llama-7B-shaped layers through launch/train.py
#                (1 GPU, NCCL, DeepSpeed ZeRO-2, bf16, packed rows): falqon, lora, fp8_lora, qlora
#
# Knobs (environment): PYTHON (python3), BUDGET_S (500: every step's timeout is cut so the whole
# check ends within it), WHEELS (wheels/
# in the repo), LAYER_REPEATS (10), MODEL_STEPS (12).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/falqon_gpu_check.XXXXXX")"  # everything but the two files lives here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
export FALQON_CACHE="${FALQON_CACHE:-$WORK/cache}"  # the embedded tiny model is built here on first use
BUDGET_S="${BUDGET_S:-500}"
LAYER_REPEATS="${LAYER_REPEATS:-10}"
MODEL_STEPS="${MODEL_STEPS:-12}"
WHEELS="${WHEELS:-$PWD/wheels}"

declare -a SUMMARY=()
FAILED=0
SKIPPED=0
START=$SECONDS

# pack: rewrite summary.txt and results.tar.gz from what exists now (atomic renames).
pack() {
    {
        echo "gpu_check: $(( ${#SUMMARY[@]} - FAILED - SKIPPED ))/${#SUMMARY[@]} steps passed, $SKIPPED skipped," \
            "$((SECONDS - START))s of ${BUDGET_S}s | $(date -u +%FT%TZ) | commit $(git rev-parse --short HEAD 2>/dev/null)"
        printf '  %s\n' "${SUMMARY[@]}"
        for table in "$WORK"/bench_merge/results.md "$WORK"/bench_layer/results.md "$WORK"/bench_model/results.md; do
            [[ -f "$table" ]] && { echo; cat "$table"; }
        done
        [[ -f "$WORK/env.log" ]] && { echo; echo "## env"; cat "$WORK/env.log"; }
    } > "$OUT/summary.txt.tmp" && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude=cache --exclude='*.safetensors' --exclude='*.pt' . 2>/dev/null \
        && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

# step NAME TIMEOUT_S COMMAND...: run COMMAND with a timeout (cut to what is left of BUDGET_S),
# log to $WORK/NAME.log, record the result, pack.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then  # reported, not a failure: raise BUDGET_S to run it
        SUMMARY+=("SKIP  $name (time budget of ${BUDGET_S}s spent)")
        SKIPPED=$((SKIPPED + 1))
        pack
        return
    fi
    local t0=$SECONDS
    echo "=== [$name] $* (timeout ${limit}s)"
    # bash -c so that the shell functions below (exported) run under timeout as well as programs
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$WORK/$name.log"
    local took=$((SECONDS - t0))
    if [[ $rc -eq 0 ]]; then
        SUMMARY+=("PASS  $name (${took}s)")
    else
        [[ $rc -eq 124 || $rc -eq 137 ]] && rc="$rc, timed out"
        SUMMARY+=("FAIL  $name (exit $rc, ${took}s): $(grep -E 'Error|error|FAILED' "$WORK/$name.log" | tail -n 1 | cut -c1-200)")
        FAILED=$((FAILED + 1))
    fi
    pack
}

env_report() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PYTHON" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
ok = torch.cuda.is_available()
print(f"cuda available: {ok}")
if ok:
    cap = torch.cuda.get_device_capability()
    print(f"gpu: {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB); "
          f"FP8 scaled_mm: {'yes' if cap >= (8, 9) else 'no (needs >= 8.9)'}")
for name in ("transformers", "peft", "triton", "deepspeed", "hydra", "transformer_engine", "bitsandbytes", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: does not import ({type(exc).__name__}: {str(exc)[:120]})")
from falqon_dist.fp8 import check_backend
try:
    check_backend("te")
    print("fp8.backend=te: available")
except ImportError as exc:
    print(f"fp8.backend=te: not available here; GPU numbers use scaled_mm ({str(exc)[:160]})")
if not ok:
    sys.exit("no CUDA device: the GPU checks cannot run")
EOF
}

# install_wheels: every package of $WHEELS whose module does not import, with --no-index.
install_wheels() {
    local missing=()
    for spec in deepspeed:deepspeed hydra:hydra-core omegaconf:omegaconf pydantic:pydantic hjson:hjson \
                cpuinfo:py-cpuinfo msgpack:msgpack einops:einops ninja:ninja psutil:psutil \
                bitsandbytes:bitsandbytes pytest:pytest; do
        "$PYTHON" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec##*:}")
    done
    # pydantic (DeepSpeed's config) needs typing-extensions >= 4.16; older ones import but fail later
    "$PYTHON" -c "import importlib.metadata as m, sys; v = m.version('typing-extensions').split('.'); \
sys.exit(0 if (int(v[0]), int(v[1])) >= (4, 16) else 1)" 2>/dev/null || missing+=("typing-extensions")
    (( ${#missing[@]} == 0 )) && { echo "nothing missing"; return 0; }
    echo "installing from $WHEELS: ${missing[*]}"
    [[ -d "$WHEELS" ]] || { echo "$WHEELS does not exist: run 'make wheels' where a registry is reachable and carry it"; return 1; }
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}"
}

# smoke STAGE: the real trainer on this GPU over NCCL (3 steps, export), then eval of the run.
smoke() {
    local stage="$1" run="$WORK/smoke_z$1"
    "$PYTHON" launch/train.py run.dir="$run" train.max_steps=3 deepspeed.zero_stage="$stage" \
        deepspeed.config="$WORK/ds_torch_adam.json" export.enabled=true train.eval_samples=32 \
        train.eval_generate_samples=8 || return 1
    grep -q '"rows_merged"' "$run/metrics.jsonl" || { echo "no merge statistics in $run/metrics.jsonl"; return 1; }
    "$PYTHON" launch/eval.py path="$run" || return 1
    rm -rf "$run/checkpoints" "$run/export"/*.safetensors  # keep logs and metrics, not weights
}

run_pytest() {
    "$PYTHON" -m pytest tests/gpu tests/unit/test_fp8.py tests/unit/test_cast.py tests/unit/test_merge.py \
        tests/unit/test_falqon_linear.py tests/unit/test_te_backend_glue.py -q -p no:cacheprovider -rs \
        --junitxml "$WORK/pytest.xml"
}

# torch_adam: DeepSpeed's fused Adam would first be JIT-built with nvcc (minutes of the budget)
printf '{"optimizer": {"type": "AdamW", "params": {"torch_adam": true}}}\n' > "$WORK/ds_torch_adam.json"

export PYTHON WORK WHEELS
export -f env_report install_wheels smoke run_pytest

step env 45 env_report
step wheels 60 install_wheels
step pytest 120 run_pytest
step smoke_z0 60 smoke 0
step smoke_z3 60 smoke 3
step bench_merge 60 "$PYTHON" benchmarks/bench_merge.py --device cuda --layers 32 --shape 4096x4096 --rank 64 \
    --rounds 5 --out "$WORK/bench_merge"
step bench_layer 100 "$PYTHON" benchmarks/bench_layer.py --device cuda --shapes 4096x4096 4096x11008 \
    --tokens 4096 16384 --rank 64 --repeats "$LAYER_REPEATS" --warmup 3 --merge-layers 0 --init random \
    --out "$WORK/bench_layer"
step bench_model 120 "$PYTHON" benchmarks/bench_model.py --shape llama-7b --layers 2 --steps "$MODEL_STEPS" --warmup 4 \
    --methods falqon lora fp8_lora qlora --timeout 70 --set train.micro_batch_size=4 model.max_length=512 \
    data.packing=true data.num_train=400 train.eval_samples=16 train.eval_generate_samples=0 \
    "deepspeed.config=$WORK/ds_torch_adam.json" --out "$WORK/bench_model"

pack
cat "$OUT/summary.txt"
exit $(( FAILED > 0 ? 1 : 0 ))
