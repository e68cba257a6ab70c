"""What every benchmark shares: timing, memory, storage accounting, instrumentation, environment, reports.

Each benchmark script (``bench_layer.py``, ``bench_model.py``, ``bench_zero.py``) imports this file
as ``common`` (scripts run from any directory: the repository root is put on ``sys.path`` here).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import json
import math
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from falqon_dist.fp8.instrument import HostSyncCounter, count_casts  # noqa: E402,F401  (re-exported)

MB = 2**20


def log(message: str) -> None:
    """A progress line on stderr (unbuffered, so a driver or a log file sees it live)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, desc: str, unit: str, total: int | None = None):
    """A tqdm progress bar on stderr (a log line without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        log(f"{desc} ...")
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, *, iters: int = 5, warmup: int = 2
) -> float:
    """Median wall-clock milliseconds of ``fn()`` (CUDA: synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int
) -> dict[str, list[float]]:
    """Per-call milliseconds of every ``fn``, one call of each per round (round-robin).

    A machine whose load changes during the run then slows every candidate alike, so the ratios
    between them stay meaningful even when the absolute numbers drift; the order rotates each round.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for index in progress(range(rounds), "timed rounds", "round"):
        # rotate who goes first: no slot is always the coldest
        shift = index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (Linux), or None."""
    try:
        match = re.search(
            rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE
        )
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
        return (_status_kb("VmRSS") or 0) * 1024

    def peak(self) -> int:
        """High-water mark in bytes since the last :meth:`reset`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        kb = _status_kb("VmHWM")
        return (
            kb * 1024
            if kb is not None
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )

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


# --------------------------------------------------------------------------- storage


def backbone_storage(module: torch.nn.Module) -> tuple[int, int]:
    """``(bytes, backbone parameters)`` of one adapted layer's frozen (or, for full, trained) weight.

    FALQON's bytes include the melded A rows and, when kept, the cached Wᵀ copy.
    """
    base = getattr(module, "base_layer", None)
    if base is not None:  # peft wrapper
        return backbone_storage(base)
    if hasattr(module, "qweight"):  # FalqonLinear / Fp8LoraLinear
        q = module.qweight
        cache = getattr(module, "weight_t_cache", None)
        extra = cache.nbytes if cache is not None else 0
        return q.numel() * q.element_size() + extra, module.in_features * module.out_features
    weight = module.weight
    # bitsandbytes Params4bit: codes + block scales
    if getattr(weight, "quant_state", None) is not None:
        from falqon_dist.baselines.qlora import nf4_weight_bytes

        return nf4_weight_bytes(weight), module.in_features * module.out_features
    return weight.data.numel() * weight.data.element_size(), weight.numel()


# --------------------------------------------------------------------------- the real trainer


def trainer_command(python: str, ranks: int, overrides: list[str]) -> list[str]:
    """``launch/train.py`` with Hydra ``overrides``: plain python for one rank, the deepspeed launcher else."""
    train_py = str(REPO / "launch" / "train.py")
    if ranks == 1:
        return [python, train_py, *overrides]
    import shutil

    launcher = shutil.which("deepspeed", path=str(Path(python).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), train_py, *overrides]


def run_trainer(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """Run one training command from the repository root: ``(exit code or None on time-out, output)``.
    ``env`` adds to (or overrides) this process's environment."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out
    return proc.returncode, proc.stdout + proc.stderr


def failure_reason(output: str, code: int | None) -> str:
    """The last line of a failed run's output that names an error, else its exit code."""
    if code is None:
        return "timed out"
    return next(
        (
            line.strip()
            for line in reversed(output.splitlines())
            if "Error" in line or "error" in line
        ),
        f"exit code {code}",
    )


def read_run_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl``."""
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


def run_summary(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One run's numbers from its ``metrics.jsonl`` records: medians over the steps after ``warmup``,
    peak memory, first/last train loss, eval loss before → after, exact match, parameter facts."""
    steps = [r for r in records if "loss" in r and "step_time_s" in r]
    evals = [r for r in records if "eval_loss" in r]
    facts = next((r for r in records if "params" in r), {})
    timed = steps[warmup:] or steps
    return {
        "status": "ok",
        "steps": len(steps),
        "step_time_ms": 1e3 * statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_mem_mb": max(
            (r.get("mem_peak_mb", float("nan")) for r in steps), default=float("nan")
        ),
        "train_loss_first": steps[0]["loss"] if steps else float("nan"),
        "train_loss_last": statistics.mean(r["loss"] for r in steps[-max(1, len(steps) // 10) :])
        if steps
        else float("nan"),
        "eval_loss_before": evals[0]["eval_loss"] if len(evals) > 1 else float("nan"),
        "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
        "exact_match": evals[-1].get("eval_exact_match") if evals else None,
        "params": facts.get("params"),
        "trainable_params": facts.get("trainable_params"),
        "param_bytes_per_param": facts["param_bytes"] / facts["params"]
        if facts.get("params")
        else float("nan"),
        "saturated_last": steps[-1].get("saturated") if steps else None,
    }


# --------------------------------------------------------------------------- environment


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, hardware and the code's commit, for the record."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for package in (
        "transformers",
        "peft",
        "bitsandbytes",
        "deepspeed",
        "triton",
        "transformer-engine",
    ):
        try:  # installed version, without importing (deepspeed would probe accelerators)
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    return env


# --------------------------------------------------------------------------- reports


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` to two decimals, or an em dash when either is missing."""
    if (
        value is None
        or reference is None
        or not reference
        or not math.isfinite(value)
        or not math.isfinite(reference)
    ):
        return "—"
    return f"{value / reference:.2f}"


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def markdown_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column (``l`` or ``r``; default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(
    path: Path,
    panels: list[tuple[str, list[str], list[float]]],
    title: str,
    highlight: str = "falqon",
) -> bool:
    """A PNG of bar panels ``(panel title, labels, values)``; False (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: PNG skipped")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel, labels, values) in zip(axes[0], panels):
        bars = ax.bar(
            labels,
            values,
            color=["C3" if label.startswith(highlight) else "C0" for label in labels],
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def finish(
    payload: dict[str, Any], write_reports: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """Write the final reports, print the markdown, say where they are; return the payload."""
    print(write_reports(payload))
    log(f"wrote {payload['out']}/results.{{json,md,png}}")
    return payload


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (a run cut short keeps the previous complete file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
