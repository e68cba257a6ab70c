#!/usr/bin/env python
"""Whole-model benchmark: every fine-tuning method side by side on one model, in one run.

    python launch/bench.py                                          # embedded tiny Llama, CPU or GPU
    python launch/bench.py --shape llama-7b --layers 2 --train-steps 8 --batch 8 --seq 512
    python launch/bench.py --shape custom --hidden 1024 --intermediate 2816 --layers 4
    python launch/bench.py --quick --out /tmp/bench                 # tiny shapes, seconds (tests)
    python launch/bench.py --lr falqon=0.05 --lr lora=1e-3 --methods falqon lora

Model: ``--model tiny`` (default) is the embedded pretrained tiny Llama
(:func:`falqon_dist.models.build_tiny_model`, cached); ``--shape llama-7b`` (hidden 4096,
intermediate 11008, 32 heads; ``--layers N`` cuts the depth so it fits) or ``--shape custom``
(``--hidden --intermediate --layers [--heads]``) builds a randomly initialized Llama from shapes
alone, with the tiny model's character tokenizer so it trains on the same synthetic task.

Methods (``--methods``, default all): ``falqon``, ``lora`` (peft, frozen backbone in the model
dtype), ``fp8_lora`` (separate FP8 adapter path), ``full``, and ``qlora`` (bitsandbytes NF4 + peft,
:func:`falqon_dist.baselines.apply_qlora`, on CPU or CUDA; skipped with the reason when bitsandbytes
does not import). Each method runs in its own subprocess, so each peak-memory number is its own.
Per method, one plain-torch AdamW
loop (no DeepSpeed, no autocast; model in bf16 on CUDA, ``--dtype`` on CPU, fp32 by default) of
``--train-steps`` steps on packed rows of the synthetic task (``--task``, default ``shift``), with
FALQON's proxy merge after every optimizer step. Reported:

* step time: median over the steps after ``--warmup`` (CUDA synchronized around each step), and
  tokens/s = processed tokens per step (rows × padded width) / median step time;
* peak memory above the pre-model baseline, during training (after the model is built and
  converted) and during load + conversion. CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
  CPU: the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
  after ``malloc_trim``) minus its resident size before the model was built; where the reset is
  not allowed, ``ru_maxrss`` (then the training peak includes the load peak, and is flagged);
* backbone bytes per parameter of the adapted linear layers, from their actual storage
  (FALQON: 1 + r/out for the melded A rows; fp8_lora: 1; bf16: 2; fp32: 4; NF4: ~0.56);
* quantize / cast ops per step: ``layers × per-layer constant`` (FALQON 3, fp8_lora 6, qlora 2 NF4
  dequantizations, bf16 methods 0) and the count measured by instrumenting one step;
* ZeRO-3 all-gather bytes per step with ``--zero3`` when DeepSpeed imports: ``launch/bench_zero.py``
  runs on 2 CPU ranks at the same layer shapes (its own random weights and vocabulary); otherwise n/a;
* eval loss on the held-out eval split before and after training (the start already includes the
  method's quantization), and exact match of greedy answers for the tiny pretrained model.

On CUDA it also times FALQON's forward FP8 GEMM (``x · M_qᵀ``, N × in × (out + r)) at the model's
layer shapes through ``resolve_backend(name).gemm`` for ``scaled_mm`` and, where Transformer Engine
imports, ``te``, with CUDA events, next to a bf16 matmul
of the same shape, as TFLOP/s and as a fraction of ``--peak-tflops`` (H200 dense FP8: ~1979).

Writes ``results.json``, ``results.md`` (tables with ratios against lora and fp8_lora) and
``results.png`` (step time and peak memory per method; skipped with a message without matplotlib)
into ``--out`` (default ``runs/bench/<timestamp>``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from falqon_dist.baselines.fp8_lora import QUANTIZE_OPS_PER_STEP as FP8_LORA_QUANTIZE_OPS  # noqa: E402
from falqon_dist.fp8 import BACKEND_NAMES  # noqa: E402

METHODS = ("falqon", "lora", "fp8_lora", "full", "qlora")
#: Learning rates measured on the tiny model (DESIGN.md §1); override with ``--lr METHOD=VALUE``.
DEFAULT_LR = {"falqon": 0.1, "lora": 3e-3, "fp8_lora": 3e-3, "full": 1e-3, "qlora": 3e-3}
#: FALQON's dynamic quantizations per layer per forward + backward: x, g and o_A (DESIGN.md §1).
FALQON_QUANTIZE_OPS = 3
#: Quantize / cast ops per adapted layer per forward + backward. fp8_lora: x, A, B, h, g, ∂L/∂h;
#: qlora: the NF4 backbone is dequantized once in forward and once in backward; bf16 methods: none.
QUANT_OPS_PER_LAYER = {
    "falqon": FALQON_QUANTIZE_OPS, "fp8_lora": FP8_LORA_QUANTIZE_OPS, "qlora": 2, "lora": 0, "full": 0,
}
#: Named layer shapes (``--shape``); ``layers`` is the full depth, cut with ``--layers``.
SHAPES = {"llama-7b": {"hidden": 4096, "intermediate": 11008, "heads": 32, "layers": 32}}
#: ``--quick``: small shapes and few steps (seconds on 2 CPU cores; used by the unit test).
QUICK_DEFAULTS = {
    "shape": "custom", "hidden": 64, "intermediate": 128, "layers": 2, "heads": 2, "rank": 8, "batch": 4,
    "seq": 64, "train_steps": 5, "warmup": 2, "threads": 1, "eval_samples": 16, "eval_generate": 8, "num_train": 200,
}
MB = 2**20


class SkipMethod(Exception):
    """A method that cannot run here (missing package or device); the reason is reported."""


def log(message: str) -> None:
    """Progress line on stderr (unbuffered, so a driver sees it live)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def parse_lr_overrides(items: list[str]) -> dict[str, float]:
    """``["falqon=0.05", ...]`` → ``{"falqon": 0.05}``; unknown methods or bad numbers raise."""
    overrides = {}
    for item in items:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            raise argparse.ArgumentTypeError(f"--lr expects METHOD=VALUE with METHOD in {METHODS}, got {item!r}")
        overrides[method] = float(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny"], help="pretrained model (ignored with --shape)")
    p.add_argument("--shape", default=None, choices=[*SHAPES, "custom"], help="randomly initialized Llama from shapes")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (--shape custom)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (--shape custom)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (cuts --shape llama-7b)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (custom default: hidden // 64)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r of every adapter method")
    p.add_argument("--backend", default="auto", choices=list(BACKEND_NAMES), help="FP8 GEMM backend (te: CUDA + Transformer Engine)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per method (0 = torch's default)")
    p.add_argument("--batch", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per packed row (max_length)")
    p.add_argument("--train-steps", type=int, default=60, help="optimizer steps per method (warm-up included)")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing median")
    p.add_argument("--lr-warmup", type=int, default=5, help="linear learning-rate warm-up steps, then constant")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE", help="override a learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    p.add_argument("--task", default="shift", help="synthetic fine-tuning task")
    p.add_argument("--num-train", type=int, default=2000, help="synthetic train records")
    p.add_argument("--eval-samples", type=int, default=200, help="eval records (eval loss)")
    p.add_argument("--eval-generate", type=int, default=64, help="eval prompts for exact match (tiny model; 0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero3", action="store_true", help="also measure ZeRO-3 all-gather bytes (needs DeepSpeed)")
    p.add_argument("--gemm-tokens", type=int, nargs="+", default=None, help="N of the CUDA GEMM timing (default: step tokens and 8192)")
    p.add_argument("--gemm-iters", type=int, default=50, help="timed GEMMs per shape")
    p.add_argument("--peak-tflops", type=float, default=1979.0, help="dense FP8 peak of the GPU (H200: ~1979)")
    p.add_argument("--method-timeout", type=float, default=None, help="seconds before a method's subprocess is killed")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps: " + ", ".join(f"{k}={v}" for k, v in QUICK_DEFAULTS.items()))
    p.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; ``--quick`` changes defaults, explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--quick" in argv:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.lr_by_method = {**DEFAULT_LR, **parse_lr_overrides(args.lr)}
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.train_steps <= args.warmup or args.warmup < 0:
        parser.error("--train-steps must exceed --warmup (≥ 0): the median needs timed steps")
    if args.shape == "custom" and (args.hidden is None or args.intermediate is None or args.layers is None):
        parser.error("--shape custom needs --hidden, --intermediate and --layers")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.backend == "te" and args.worker is None:
        from falqon_dist.fp8 import check_backend

        try:
            check_backend("te")
        except ImportError as exc:
            parser.error(f"--backend te: {exc}")
    if args.dtype == "auto":
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    if args.out is None:
        args.out = REPO / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    return args


# --------------------------------------------------------------------------- model spec


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """What to build: ``{"kind": "tiny", "path"}`` or ``{"kind": "shape", hidden, intermediate, layers, heads}``."""
    if args.shape is None:
        from falqon_dist.models import build_tiny_model, tiny_config

        config = tiny_config()
        return {
            "kind": "tiny", "name": "tiny (embedded, pretrained)", "path": str(build_tiny_model()),
            "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
        }
    base = dict(SHAPES.get(args.shape, {}))
    hidden = args.hidden or base["hidden"]
    intermediate = args.intermediate or base["intermediate"]
    layers = args.layers or base["layers"]
    heads = args.heads or base.get("heads") or max(1, hidden // 64)
    if hidden % heads or (hidden // heads) % 2:
        raise SystemExit(f"hidden {hidden} must split into {heads} heads of an even size")
    name = f"{args.shape} shapes, {layers} layer{'s' if layers != 1 else ''}, random init"
    return {"kind": "shape", "name": name, "hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads}


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_tokenizer(spec: dict[str, Any]):
    """The tiny model's tokenizer (saved with it, or rebuilt for shape-only models)."""
    if spec["kind"] == "tiny":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec["path"])
    from falqon_dist.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


def build_model(spec: dict[str, Any], tokenizer, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """The base model on ``device`` in ``dtype`` (identical weights in every method's process)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec["kind"] == "tiny":
        return AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).to(device)
    config = LlamaConfig(
        vocab_size=16 * math.ceil(len(tokenizer) / 16),
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"], max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialized in place, in the target dtype: no float32 copy
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# --------------------------------------------------------------------------- methods


def check_runnable(method: str, device: torch.device, *, try_import: bool = True) -> None:
    """Raise :class:`SkipMethod` when ``method`` cannot run here (qlora: bitsandbytes must import;
    it runs on CPU and CUDA alike)."""
    if method != "qlora":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SkipMethod("bitsandbytes is not installed (pip install -e .[qlora])")
    if not try_import:
        return
    from falqon_dist.baselines.qlora import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError as exc:  # missing, or a broken native library
        raise SkipMethod(str(exc)) from None


def prepare(model: torch.nn.Module, method: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    """Apply ``method`` in place; return the adapted module names (for ``full``: its linear targets).

    qlora quantizes on the device the model was built on (``build_model`` already moved it there).
    """
    from falqon_dist.baselines import prepare_model, target_module_names

    targets = target_module_names(model)
    prepare_model(model, method, rank=args.rank, backend=args.backend)
    return targets


def _backbone_storage(module: torch.nn.Module) -> tuple[int, int]:
    """``(bytes, backbone parameters)`` of one adapted layer's frozen (or, for full, trained) weight."""
    base = getattr(module, "base_layer", None)
    if base is not None:  # peft wrapper
        return _backbone_storage(base)
    if hasattr(module, "qweight"):  # FalqonLinear / Fp8LoraLinear
        q = module.qweight
        return q.numel() * q.element_size(), module.in_features * module.out_features
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit: codes + block scales
        from falqon_dist.baselines.qlora import nf4_weight_bytes

        return nf4_weight_bytes(weight), module.in_features * module.out_features
    return weight.data.numel() * weight.data.element_size(), weight.numel()


def backbone_bytes_per_param(model: torch.nn.Module, targets: list[str]) -> float:
    """Bytes of backbone storage per backbone parameter over the adapted layers."""
    total_bytes = total_params = 0
    for name in targets:
        nbytes, nparams = _backbone_storage(model.get_submodule(name))
        total_bytes, total_params = total_bytes + nbytes, total_params + nparams
    return total_bytes / max(total_params, 1)


@contextlib.contextmanager
def count_quantize_ops() -> Iterator[list[int]]:
    """Count the FP8 layers' dynamic casts (any backend) and bitsandbytes 4-bit dequantizations."""
    from falqon_dist.baselines.qlora import NF4DequantCounter
    from falqon_dist.fp8.instrument import count_casts

    counter = [0]
    with count_casts() as casts, NF4DequantCounter() as nf4:
        yield counter
    counter[0] = len(casts) + nf4.count


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (Linux), or None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator stats, or the process's resident high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu resident (VmHWM)"
        self.resettable = device.type == "cuda"
        self.baseline = self.current()

    def current(self) -> int:
        """Bytes in use now."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        kb = _status_kb("VmRSS")
        return (kb or 0) * 1024

    def peak(self) -> int:
        """High-water mark in bytes since the last :meth:`reset`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kb = _status_kb("VmHWM")
        return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> None:
        """Start a new high-water mark (CPU: after returning freed heap to the OS)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
            self.kind = "cpu ru_maxrss (not resettable: includes load)"

    def peak_mb(self) -> float:
        return (self.peak() - self.baseline) / MB


# --------------------------------------------------------------------------- worker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(bundle, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of packed rows (one epoch after another)."""
    sampler = bundle.train_batch_sampler(batch_size=batch_size, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        produced = False
        for indices in sampler:
            produced = True
            yield bundle.collate_fn([bundle.train[i] for i in indices])
        if not produced:
            raise SystemExit(f"not enough packed rows for one batch of {batch_size}: raise --num-train")
        epoch += 1


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train(model, bundle, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The timed AdamW loop; FALQON merges its proxies after every step. Returns timings and losses."""
    from falqon_dist.method import merge_proxies_

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr_by_method[method], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.lr_warmup))
    model.train()
    times, tokens, losses, quantize_ops = [], [], [], None
    batches = _batches(bundle, args.batch)
    report_every = max(1, args.train_steps // 5)
    for step in range(args.train_steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        counting = count_quantize_ops() if step == 0 else contextlib.nullcontext([0])
        _sync(device)
        start = time.perf_counter()
        with counting as counter:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        scheduler.step()
        if method == "falqon":
            merge_proxies_(model)
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        elapsed = time.perf_counter() - start
        if step == 0:
            quantize_ops = counter[0]
        if step >= args.warmup:
            times.append(elapsed)
            tokens.append(batch["input_ids"].numel())
        losses.append(float(loss.detach()))
        if (step + 1) % report_every == 0 or step + 1 == args.train_steps:
            log(f"{method}: step {step + 1}/{args.train_steps} loss {losses[-1]:.3f} {elapsed * 1e3:.0f} ms")
    step_s = statistics.median(times)
    return {
        "step_time_ms": step_s * 1e3,
        "step_times_ms": [t * 1e3 for t in times],
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": statistics.mean(tokens) / step_s,
        "train_loss_first": losses[0],
        "train_loss_last": statistics.mean(losses[-max(1, len(losses) // 10) :]),
        "quantize_ops_measured": quantize_ops,
        "trainable_params": sum(p.numel() for p in params),
    }


def evaluate(model, tokenizer, bundle, spec: dict[str, Any], args: argparse.Namespace, generate: bool) -> dict[str, Any]:
    """Eval loss on the eval split; exact match of greedy answers for the tiny pretrained model."""
    from falqon_dist.data import evaluate_exact_match, mean_response_loss

    result: dict[str, Any] = {"eval_loss": mean_response_loss(model, bundle.eval, bundle.collate_fn, batch_size=32)}
    if generate and spec["kind"] == "tiny" and args.eval_generate > 0:
        records = bundle.eval_records[: args.eval_generate]
        result["exact_match"] = evaluate_exact_match(model, tokenizer, records, batch_size=32)
    return result


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything measured for one method, in this (fresh) process."""
    from falqon_dist.data import DataConfig, build_data

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_runnable(method, device)
    dtype = torch_dtype(args.dtype)
    spec = model_spec(args)
    tokenizer = load_tokenizer(spec)
    data_cfg = DataConfig(
        name="synthetic", task=args.task, max_length=args.seq, packing=True,
        num_train=args.num_train, num_eval=args.eval_samples, seed=args.seed,
    )
    bundle = build_data(data_cfg, tokenizer)
    meter = MemoryMeter(device)
    meter.reset()
    log(f"{method}: building {spec['name']} ({args.dtype}, {device})")
    model = build_model(spec, tokenizer, dtype, device, args.seed)
    targets = prepare(model, method, args, device)
    load_peak_mb = meter.peak_mb()
    before = evaluate(model, tokenizer, bundle, spec, args, generate=False)
    meter.reset()
    log(f"{method}: {len(targets)} adapted layers, lr {args.lr_by_method[method]:g}, training {args.train_steps} steps")
    result = train(model, bundle, method, args, device)
    result["peak_mem_mb"] = meter.peak_mb()
    after = evaluate(model, tokenizer, bundle, spec, args, generate=True)
    per_layer = QUANT_OPS_PER_LAYER[method]
    result.update(
        status="ok",
        lr=args.lr_by_method[method],
        load_peak_mem_mb=load_peak_mb,
        memory_kind=meter.kind,
        peak_includes_load=not meter.resettable,
        adapted_layers=len(targets),
        backbone_bytes_per_param=backbone_bytes_per_param(model, targets),
        quantize_ops_per_step=per_layer * len(targets),
        quantize_ops_formula=f"{len(targets)} layers x {per_layer}",
        eval_loss_before=before["eval_loss"],
        eval_loss=after["eval_loss"],
        exact_match=after.get("exact_match"),
    )
    log(f"{method}: {result['step_time_ms']:.1f} ms/step, peak {result['peak_mem_mb']:.0f} MB, "
        f"eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    return result


def worker_main(args: argparse.Namespace) -> None:
    """Run one method and write its JSON (errors and skips included) to ``--worker-result``."""
    try:
        result = run_method(args.worker, args)
    except SkipMethod as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # reported as the method's row; the other methods still run
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    result["method"] = args.worker
    args.worker_result.write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- driver


def _strip_out(argv: list[str]) -> list[str]:
    """``argv`` without ``--out X`` / ``--out=X`` (workers write only their result file)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--out":
            skip = True
        elif not item.startswith("--out="):
            kept.append(item)
    return kept


def run_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``method`` in a fresh subprocess (its own memory high-water mark); return its result."""
    try:  # no subprocess for a method that cannot run here
        check_runnable(method, torch.device(args.device), try_import=False)
    except SkipMethod as exc:
        log(f"=== {method} === skipped: {exc}")
        return {"method": method, "status": "skipped", "reason": str(exc), "wall_s": 0.0}
    result_path = args.out / f".{method}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *_strip_out(args.argv),
           "--worker", method, "--worker-result", str(result_path)]
    log(f"=== {method} ===")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.method_timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    else:
        result = {"method": method, "status": "error", "reason": f"worker exited with {code} and no result"}
    result["wall_s"] = time.perf_counter() - start
    if result["status"] != "ok":
        log(f"{method}: {result['status']}: {result.get('reason')}")
    return result


def _cuda_ms(fn, iters: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls, timed with CUDA events after 5 warm-ups."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def gemm_backends(device: torch.device) -> list[str]:
    """FP8 GEMM backends to time on ``device``: ``scaled_mm``, plus ``te`` where it can run."""
    from falqon_dist.fp8 import check_backend

    backends = ["scaled_mm"]
    try:
        check_backend("te")
        backends.append("te")
    except ImportError as exc:
        log(f"gemm: te backend not measured ({exc})")
    return backends


def gemm_throughput(spec: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """FALQON's forward FP8 GEMM ``x · M_qᵀ`` at each layer shape, per GPU backend, vs a bf16 matmul."""
    from falqon_dist.fp8 import E4M3, quantize_dynamic, resolve_backend

    device = torch.device(args.device)
    h, i, r = spec["hidden"], spec["intermediate"], args.rank
    shapes = {"q/k/v/o_proj": (h, h), "gate/up_proj": (h, i), "down_proj": (i, h)}
    tokens = args.gemm_tokens or sorted({args.batch * args.seq, 8192})
    gen = torch.Generator(device=device).manual_seed(0)
    backends = gemm_backends(device)
    rows = []
    for layer, (in_f, out_f) in shapes.items():
        for n in tokens:
            x = torch.randn(n, in_f, device=device, dtype=torch.bfloat16, generator=gen)
            melded = torch.randn(out_f + r, in_f, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            x_fp8, sx = quantize_dynamic(x, E4M3)
            m_fp8, sm = quantize_dynamic(melded, E4M3)
            m_t, melded_t = m_fp8.t(), melded.t()
            flop = 2 * n * (out_f + r) * in_f
            bf16_ms = _cuda_ms(lambda: x @ melded_t, args.gemm_iters)
            for name in backends:
                backend = resolve_backend(name, device)
                fp8_ms = _cuda_ms(lambda: backend.gemm(x_fp8, m_t, sx, sm, torch.bfloat16), args.gemm_iters)
                tflops = flop / fp8_ms / 1e9
                rows.append({
                    "layer": layer, "backend": name, "tokens": n, "in_features": in_f, "out_plus_rank": out_f + r,
                    "fp8_ms": fp8_ms, "fp8_tflops": tflops, "fraction_of_peak": tflops / args.peak_tflops,
                    "bf16_ms": bf16_ms, "bf16_tflops": flop / bf16_ms / 1e9, "speedup_vs_bf16": bf16_ms / fp8_ms,
                })
                log(f"gemm {layer} N={n} [{name}]: fp8 {tflops:.0f} TFLOP/s ({tflops / args.peak_tflops:.0%} of peak), "
                    f"bf16 {rows[-1]['bf16_tflops']:.0f}")
            del x, melded, x_fp8, m_fp8
    return rows


def zero3_allgather(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """ZeRO-3 all-gather bytes per step by method, from ``launch/bench_zero.py`` on 2 CPU ranks."""
    if importlib.util.find_spec("deepspeed") is None:
        return {"status": "n/a", "reason": "deepspeed is not installed"}
    methods = [m for m in args.methods if m in ("falqon", "lora", "full")]
    out = args.out / "zero3"
    cmd = [
        sys.executable, str(REPO / "launch" / "bench_zero.py"), "--stages", "3", "--methods", *methods,
        "--hidden", str(spec["hidden"]), "--intermediate", str(spec["intermediate"]), "--layers", str(spec["layers"]),
        "--rank", str(args.rank), "--batch", "2", "--seq", str(min(args.seq, 128)), "--steps", "1", "--out", str(out),
    ]
    log(f"=== ZeRO-3 all-gather ({', '.join(methods)}) via launch/bench_zero.py ===")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "error", "reason": (proc.stdout + proc.stderr)[-1500:]}
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {
        "status": "ok",
        "note": "2 gloo CPU ranks, bench_zero's own random weights, micro-batch 2 rows per rank; fp8_lora/qlora: no ZeRO-3 loader",
        "by_method": {row["method"]: row for row in rows},
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the record."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for package in ("transformers", "peft", "bitsandbytes", "deepspeed", "matplotlib"):
        try:  # installed version, without importing (deepspeed would probe accelerators)
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    return env


# --------------------------------------------------------------------------- reports


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or not ref or not math.isfinite(value) or not math.isfinite(ref):
        return "—"
    return f"{value / ref:.2f}"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _zero3_cell(method: str, zero3: dict[str, Any]) -> str:
    row = zero3.get("by_method", {}).get(method)
    if row is None:
        return "n/a"
    by_dtype = " + ".join(f"{dtype} {nbytes / 1e6:.1f}" for dtype, (nbytes, _) in row["allgather_by_dtype"].items())
    return f"{row['allgather_bytes_per_step'] / 1e6:.1f} ({by_dtype}; {row['allgather_bytes_per_param']:.2f} B/param)"


def markdown(payload: dict[str, Any]) -> str:
    """``results.md``: the method table (ratios against lora and fp8_lora) and the GEMM table."""
    cfg, rows, zero3 = payload["config"], payload["methods"], payload["zero3"]
    ok = {r["method"]: r for r in rows if r["status"] == "ok"}
    lora, fp8 = ok.get("lora", {}), ok.get("fp8_lora", {})
    env = payload["env"]
    lines = [
        f"# falqon_dist benchmark: {payload['model']['name']}",
        "",
        f"hidden {payload['model']['hidden']}, intermediate {payload['model']['intermediate']}, "
        f"{payload['model']['layers']} layers | rank {cfg['rank']} | {cfg['batch']}×{cfg['seq']} packed tokens/step | "
        f"{cfg['train_steps']} AdamW steps (median of the last {cfg['train_steps'] - cfg['warmup']}) | "
        f"{cfg['dtype']} | FP8 backend {cfg['backend']} | {env['device']}{' ' + env['gpu'] if 'gpu' in env else ''} | "
        f"torch {env['torch']} | {env['threads']} threads | memory: {payload['memory_kind']}",
        "",
        "| method | lr | step ms | × lora | × fp8_lora | tokens/s | peak MB | × lora | × fp8_lora | load peak MB "
        "| backbone B/param | quant ops/step | ZeRO-3 all-gather MB/step | eval loss start → end | exact match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r.get('reason', '')} |" + " |" * 13)
            continue
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['step_time_ms']:.1f} | {_ratio(r['step_time_ms'], lora.get('step_time_ms'))} "
            f"| {_ratio(r['step_time_ms'], fp8.get('step_time_ms'))} | {r['tokens_per_s']:,.0f} | {r['peak_mem_mb']:.1f} "
            f"| {_ratio(r['peak_mem_mb'], lora.get('peak_mem_mb'))} | {_ratio(r['peak_mem_mb'], fp8.get('peak_mem_mb'))} "
            f"| {r['load_peak_mem_mb']:.1f} | {r['backbone_bytes_per_param']:.3f} "
            f"| {r['quantize_ops_per_step']} ({r['quantize_ops_formula']}; measured {r['quantize_ops_measured']}) "
            f"| {_zero3_cell(r['method'], zero3)} | {r['eval_loss_before']:.3f} → {r['eval_loss']:.3f} "
            f"| {_fmt(r['exact_match'], '.2f')} |"
        )
    if zero3.get("status") != "ok":
        lines += ["", f"ZeRO-3 all-gather: {zero3.get('status')} ({zero3.get('reason', '')[:300]})"]
    else:
        lines += ["", f"ZeRO-3 all-gather: {zero3['note']}"]
    gemm = payload["gemm"]
    lines += ["", "## FALQON forward FP8 GEMM (x · M_qᵀ) vs bf16 matmul", ""]
    if not gemm:
        lines.append("n/a (CUDA only)")
    else:
        lines += [
            f"| layer | backend | N | in | out + r | FP8 ms | FP8 TFLOP/s | of {cfg['peak_tflops']:g} peak "
            "| bf16 TFLOP/s | FP8 speed-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in gemm:
            lines.append(
                f"| {g['layer']} | {g.get('backend', 'scaled_mm')} | {g['tokens']} | {g['in_features']} | {g['out_plus_rank']} | {g['fp8_ms']:.3f} "
                f"| {g['fp8_tflops']:.0f} | {g['fraction_of_peak']:.0%} | {g['bf16_tflops']:.0f} | {g['speedup_vs_bf16']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> bool:
    """``results.png``: bar charts of step time and peak memory; False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: results.png skipped")
        return False
    rows = [r for r in payload["methods"] if r["status"] == "ok"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "step_time_ms", "step time (ms, median)"), (axes[1], "peak_mem_mb", "peak memory (MB)")):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=["C3" if n == "falqon" else "C0" for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{payload['model']['name']} | {payload['env']['device']} | rank {payload['config']['rank']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(payload: dict[str, Any], out: Path, *, with_png: bool) -> str:
    """Write ``results.json`` and ``results.md`` (and ``results.png``); return the markdown."""
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    text = markdown(payload)
    (out / "results.md").write_text(text)
    if with_png:
        plot(payload, out / "results.png")
    return text


def driver_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method in its own process, then the GEMM and ZeRO-3 measurements; write the reports.

    The JSON and markdown are rewritten after every method, so a run cut short keeps what it measured.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    spec = model_spec(args)  # builds the tiny model once, before the workers need it
    log(f"{spec['name']}: hidden {spec['hidden']}, intermediate {spec['intermediate']}, {spec['layers']} layers, "
        f"{args.dtype} on {device}, methods {', '.join(args.methods)} -> {args.out}")
    payload: dict[str, Any] = {
        "model": {k: v for k, v in spec.items() if k != "path"},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("argv", "worker", "worker_result", "lr")},
        "env": {**environment(device), "threads": args.threads or torch.get_num_threads()},
        "memory_kind": None,
        "methods": [],
        "gemm": [],
        "zero3": {"status": "n/a", "reason": "--zero3 not given"},
    }
    for method in args.methods:
        row = run_worker(method, args)
        payload["methods"].append(row)
        if row["status"] == "ok" and payload["memory_kind"] is None:
            payload["memory_kind"] = row["memory_kind"]
        write_reports(payload, args.out, with_png=False)
    if device.type == "cuda":
        payload["gemm"] = gemm_throughput(spec, args)
    if args.zero3:
        payload["zero3"] = zero3_allgather(spec, args)
    text = write_reports(payload, args.out, with_png=True)
    print(text, flush=True)
    png = ", results.png" if (args.out / "results.png").exists() else ""
    log(f"wrote {args.out / 'results.json'}, results.md{png}")
    return payload


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
