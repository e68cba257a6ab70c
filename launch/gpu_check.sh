#!/usr/bin/env bash
# One-command check of falqon_dist on a CUDA machine (at most BUDGET_S = 450 s; about 3-5 minutes on one H200).
#
#   bash launch/gpu_check.sh                  # writes runs/gpu_check/<timestamp>/
#   OUT=/some/dir bash launch/gpu_check.sh    # writes into $OUT (the lent device collects $OUT)
#   PYTHON=/path/to/python bash launch/gpu_check.sh
#
# Needs only python with torch (CUDA build), transformers and peft; DeepSpeed, Transformer Engine,
# bitsandbytes and matplotlib are optional and reported. Steps (each runs even when an earlier one
# failed; a summary of passed / failed steps is printed and written to summary.txt at the end):
#
#   env        GPU, torch / CUDA versions, which optional packages import, whether fp8.backend=te can
#              run here (Transformer Engine >= 2.2 on CUDA)
#   imports    falqon_dist, .method, .baselines, .fp8, .data, .models import without DeepSpeed
#   pytest     tests/gpu tests/unit/test_fp8.py tests/unit/test_falqon_linear.py
#   bench_7b   launch/bench.py on two Llama-7B-shaped layers, bf16, FP8 backend auto, every method
#              (its GEMM table times scaled_mm, and te where it runs)
#   bench_layer launch/bench_layer.py at 4096x4096, rank 64, on cuda (te rows where it runs)
#   bench_7b_te bench_7b for the FP8 methods with fp8.backend=te -- only where Transformer Engine runs
#
# Knobs (environment): BUDGET_S (450: every step's timeout is cut so the whole check ends within it),
# BENCH_STEPS (12), BENCH_BATCH (8), BENCH_SEQ (512), BENCH_LAYERS (2), WHEELS (default: wheels/ in
# the repo when present): a folder of wheels installed with --no-index for what is missing -- pytest
# (the GPU test tier) and bitsandbytes (the qlora rows) -- made beforehand on a machine with a registry:
#   pip download pytest -d wheels/                                           # about 1 MB
#   pip download bitsandbytes --no-deps --only-binary :all: -d wheels/       # about 41 MB (CUDA kernels)
# wheels/ is git-ignored; on the lent device carry it (carry=["wheels"], 64 MiB at most in all).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python}"
OUT="${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONWARNINGS=ignore
BENCH_STEPS="${BENCH_STEPS:-12}"
BENCH_BATCH="${BENCH_BATCH:-8}"
BENCH_SEQ="${BENCH_SEQ:-512}"
BENCH_LAYERS="${BENCH_LAYERS:-2}"
BUDGET_S="${BUDGET_S:-450}"

declare -a SUMMARY=()
FAILED=0
SKIPPED=0
START=$SECONDS

# step NAME TIMEOUT_S COMMAND...: run COMMAND with a timeout (cut to what is left of BUDGET_S),
# log to $OUT/NAME.log, record the result.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then  # reported, not a failure: raise BUDGET_S to run it
        SUMMARY+=("SKIP  $name (time budget of ${BUDGET_S}s spent)")
        SKIPPED=$((SKIPPED + 1))
        return
    fi
    local t0=$SECONDS
    echo "=== [$name] $* (timeout ${limit}s)"
    # bash -c so that the shell functions below (exported) run under timeout as well as programs
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    if [[ $rc -eq 0 ]]; then
        SUMMARY+=("PASS  $name (${took}s)")
    else
        [[ $rc -eq 124 || $rc -eq 137 ]] && rc="$rc, timed out"
        SUMMARY+=("FAIL  $name (exit $rc, ${took}s, see $name.log)")
        FAILED=$((FAILED + 1))
    fi
}

env_report() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
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
for name in ("transformers", "peft", "deepspeed", "transformer_engine", "bitsandbytes", "matplotlib", "pytest"):
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
    print(f"fp8.backend=te: not available here, its tests skip and GPU numbers use scaled_mm ({str(exc)[:200]})")
if not ok:
    sys.exit("no CUDA device: the GPU checks cannot run")
EOF
}

imports_without_deepspeed() {
    "$PYTHON" - <<'EOF'
import importlib, sys
bad = []
for name in ("falqon_dist", "falqon_dist.method", "falqon_dist.baselines", "falqon_dist.fp8",
             "falqon_dist.data", "falqon_dist.models"):
    try:
        importlib.import_module(name)
        print(f"ok   {name}")
    except Exception as exc:
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
        bad.append(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "transformer_engine"))
print("deepspeed / transformer_engine modules loaded by these imports:", loaded[:5] or "none")
sys.exit(1 if bad or loaded else 0)
EOF
}

# install_missing PACKAGE: install it from $WHEELS (no registry) if it does not import; fails with a hint.
install_missing() {
    "$PYTHON" -c "import $1" 2>/dev/null && return 0
    if compgen -G "$WHEELS/$1-*.whl" >/dev/null; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$1" && return 0
    fi
    echo "$1 is not installed and $WHEELS has no wheel for it: 'pip download $1 -d wheels/' where a registry is reachable"
    return 1
}

run_pytest() {
    install_missing pytest || return 1
    install_missing bitsandbytes || echo "(qlora rows and tests will be skipped)"
    "$PYTHON" -m pytest tests/gpu tests/unit/test_fp8.py tests/unit/test_falqon_linear.py \
        tests/unit/test_te_backend_glue.py -q -p no:cacheprovider -rs \
        --junitxml "$OUT/pytest.xml"
}

te_usable() {
    "$PYTHON" -c "from falqon_dist.fp8 import check_backend; check_backend('te')" >/dev/null 2>&1
}

WHEELS="${WHEELS:-$PWD/wheels}"
export PYTHON OUT WHEELS
export -f env_report imports_without_deepspeed install_missing run_pytest

step env 60 env_report
step imports 60 imports_without_deepspeed
step pytest 150 run_pytest
step bench_7b 240 "$PYTHON" launch/bench.py --shape llama-7b --layers "$BENCH_LAYERS" --train-steps "$BENCH_STEPS" \
    --warmup 3 --batch "$BENCH_BATCH" --seq "$BENCH_SEQ" --eval-samples 64 --backend auto --dtype bf16 \
    --device cuda --method-timeout 60 --out "$OUT/bench_7b"
step bench_layer 90 "$PYTHON" launch/bench_layer.py --device cuda --in-features 4096 --out-features 4096 --rank 64 \
    --tokens 4096 --repeats 20 --warmup 3 --json "$OUT/bench_layer.json"

if te_usable; then
    step bench_7b_te 150 "$PYTHON" launch/bench.py --shape llama-7b --layers "$BENCH_LAYERS" --train-steps "$BENCH_STEPS" \
        --warmup 3 --batch "$BENCH_BATCH" --seq "$BENCH_SEQ" --eval-samples 64 --backend te --dtype bf16 \
        --methods falqon fp8_lora --device cuda --method-timeout 60 --out "$OUT/bench_7b_te"
fi

{
    echo "gpu_check: $(( ${#SUMMARY[@]} - FAILED - SKIPPED ))/${#SUMMARY[@]} steps passed, $SKIPPED skipped" \
        "in $((SECONDS - START))s -> $OUT"
    printf '  %s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
exit $(( FAILED > 0 ? 1 : 0 ))
