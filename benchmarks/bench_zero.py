#!/usr/bin/env python
"""ZeRO stage × method on 2 ranks: step time, per-rank peak memory, backbone all-gather volume.

    python benchmarks/bench_zero.py                       # CPU: 2 gloo ranks, a ~60M-parameter Llama
    python benchmarks/bench_zero.py --stages 3 --hidden 1024 --layers 12 --out runs/bench_zero

The driver saves one bf16 checkpoint, then launches one ``torchrun`` job per (stage, method), so each
job's peak memory is its own (reported as private/anonymous memory, sampled, and as ``ru_maxrss``,
which also counts the checkpoint pages every rank maps while loading). FALQON under ZeRO-3 loads
through ``zero.Init`` and converts layer by layer; the baseline (``lora``: peft LoRA on a frozen
bf16 backbone) loads the same checkpoint the way ``launch/train.py`` does. All-gather bytes come
from DeepSpeed's comms logger over one optimizer step; ``bytes/param`` divides them by the
partitioned parameters × 2 gather passes (forward + backward).
Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PrivateMemorySampler:
    """High-water mark of this process's *anonymous* resident memory (RssAnon), sampled every 5 ms.

    ``ru_maxrss`` also counts file pages the process has touched, e.g. a safetensors checkpoint every
    rank memory-maps while loading (shared through the page cache, not a per-rank cost); RssAnon is
    what each rank really owns.
    """

    def __init__(self) -> None:
        import threading

        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_mb, self.current_mb())


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from falqon_dist.distributed import initialize
    from falqon_dist.distributed.zero3_init import load_pretrained_zero3
    from falqon_dist.distributed.zero_facts import is_partitioned
    from falqon_dist.methods import config_fields, method_config, post_optimizer_hook, prepare_model

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = tdist.get_rank()
    baseline_mb = _rss_mb()
    private_baseline_mb = PrivateMemorySampler.current_mb()
    sampler = PrivateMemorySampler()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    start = time.perf_counter()
    fields = {
        key: value
        for key, value in (("rank", args.rank), ("backend", "emulated"))
        if key in config_fields(args.method)
    }
    method = method_config(args.method, fields)
    if args.method == "falqon" and args.stage == 3:
        model, _ = load_pretrained_zero3(args.model_dir, ds_config, method)
    else:
        hf_ds = HfDeepSpeedConfig(ds_config) if args.stage == 3 else None  # noqa: F841  (zero.Init load)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.bfloat16, trust_remote_code=False
        )
        prepare_model(model, method)
    load_s = time.perf_counter() - start
    load_peak_mb = _rss_mb() - baseline_mb  # load + convert, before DeepSpeed allocates its buffers
    load_private_mb = max(sampler.peak_mb, sampler.current_mb()) - private_baseline_mb
    engine = initialize(model, ds_config)
    # FALQON's merge; None otherwise
    hook = post_optimizer_hook(method, engine.module, engine.optimizer)

    partitioned = sum(p.ds_numel for p in engine.module.parameters() if is_partitioned(p))
    gathered: dict[str, list[int]] = {}  # dtype -> [bytes, elements]
    # ZeRO-3 gathers through the torch backend's all_gather_function
    backend = deepspeed.comm.comm.cdb
    original_all_gather = backend.all_gather_function

    def counting_all_gather(output_tensor, input_tensor, *a, **kw):
        entry = gathered.setdefault(str(output_tensor.dtype).replace("torch.", ""), [0, 0])
        entry[0] += output_tensor.numel() * output_tensor.element_size()
        entry[1] += output_tensor.numel()
        return original_all_gather(output_tensor, input_tensor, *a, **kw)

    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, 2048, (args.batch, args.seq), generator=gen)
        profile = step == args.warmup
        backend.all_gather_function = counting_all_gather if profile else original_all_gather
        t0 = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()  # gradient_accumulation_steps 1: every step is an optimizer step
        if hook is not None:
            hook(engine.global_steps)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    backend.all_gather_function = original_all_gather
    total_bytes = sum(b for b, _ in gathered.values())
    total_elements = sum(n for _, n in gathered.values())
    private_peak_mb = sampler.stop() - private_baseline_mb
    result = {
        "private_peak_mb": private_peak_mb,
        "load_private_peak_mb": load_private_mb,
        "stage": args.stage,
        "method": args.method,
        "rank": rank,
        "step_s_median": statistics.median(times),
        "peak_rss_mb": _rss_mb() - baseline_mb,
        "load_peak_rss_mb": load_peak_mb,
        "load_s": load_s,
        "allgather_bytes_per_step": total_bytes,
        "allgather_by_dtype": gathered,
        "partitioned_params": partitioned,
        "allgather_bytes_per_param": total_bytes / total_elements if total_elements else 0.0,
        "gather_passes": total_elements / partitioned if partitioned else 0.0,
    }
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    tdist.barrier()


def build_checkpoint(args: argparse.Namespace, directory: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _mb(row: dict, dtype: str) -> str:
    return f"{row['allgather_by_dtype'].get(dtype, [0, 0])[0] / 1e6:.1f}"


def driver(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        n_params = build_checkpoint(args, model_dir)
        checkpoint_mb = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6
        print(f"model: {n_params / 1e6:.1f}M parameters (bf16 checkpoint {checkpoint_mb:.0f} MB)")
        rows = []
        for stage in args.stages:
            for method in args.methods:
                result = Path(tmp) / f"s{stage}-{method}"
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(29600 + stage * 10 + len(rows)),
                    __file__,
                    "--worker",
                    "--stage",
                    str(stage),
                    "--method",
                    method,
                    "--model-dir",
                    str(model_dir),
                    "--result",
                    str(result),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--rank",
                    str(args.rank),
                ]
                print(f"ZeRO-{stage} {method} ...", flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(
                        f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
                    )
                ranks = [
                    json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(2)
                ]
                rows.append(
                    {
                        "stage": stage,
                        "method": method,
                        "step_s": max(r["step_s_median"] for r in ranks),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                        "load_peak_rss_mb": max(r["load_peak_rss_mb"] for r in ranks),
                        "private_peak_mb": max(r["private_peak_mb"] for r in ranks),
                        "load_private_peak_mb": max(r["load_private_peak_mb"] for r in ranks),
                        "allgather_bytes_per_step": ranks[0]["allgather_bytes_per_step"],
                        "allgather_bytes_per_param": ranks[0]["allgather_bytes_per_param"],
                        "allgather_by_dtype": ranks[0]["allgather_by_dtype"],
                        "gather_passes": ranks[0]["gather_passes"],
                    }
                )
    table = [
        f"ZeRO stage × method on 2 CPU ranks (gloo), {n_params / 1e6:.1f}M-parameter Llama, bf16, "
        f"micro-batch {args.batch}×{args.seq} tokens per rank, median of {args.steps} steps after {args.warmup}",
        "",
        "| stage | method | step s | peak private MB/rank (load) | peak RSS MB/rank (load) "
        "| all-gather MB/step (uint8 + bf16) | bytes/param | passes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['stage']} | {r['method']} | {r['step_s']:.2f} | "
            f"{r['private_peak_mb']:.0f} ({r['load_private_peak_mb']:.0f}) | "
            f"{r['peak_rss_mb']:.0f} ({r['load_peak_rss_mb']:.0f}) | "
            f"{r['allgather_bytes_per_step'] / 1e6:.1f} ({_mb(r, 'uint8')} + {_mb(r, 'bfloat16')}) | "
            f"{r['allgather_bytes_per_param']:.2f} | {r['gather_passes']:.2f} |"
        )
    text = "\n".join(table)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"n_params": n_params, "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["falqon", "lora"])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="runs/bench_zero")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
