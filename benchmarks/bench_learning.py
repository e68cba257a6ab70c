#!/usr/bin/env python
"""Learning efficacy: a learning-rate sweep of LoRA and each FALQON variant, side by side, in one run.

    python benchmarks/bench_learning.py                              # the demo task, 300 steps, 1 process
    python benchmarks/bench_learning.py --tasks demo kjv --jobs 2    # both tasks, two runs at a time
    python benchmarks/bench_learning.py --variants lora falqon_all --lr-scale 0.5 1 2
    python benchmarks/bench_learning.py --quick --out /tmp/bl        # seconds (used by the tests)

Every (task, variant, learning rate) is one run of the real trainer (``launch/train.py``, same data,
seed, steps and schedule); its ``metrics.jsonl`` gives the final eval loss and exact match. A variant
is a method plus overrides and a default learning rate; each is swept over ``--lr-scale`` × its
default (so the same relative grid serves LoRA's 3e-3 and FALQON's 0.05):

==================  =====================================================  ========
variant             overrides                                              lr
==================  =====================================================  ========
lora                method=lora                                            3e-3
falqon_paper        method=falqon method.merge=paper                       0.1
falqon_stochastic   falqon_paper + method.merge_rounding=stochastic        0.1
falqon_keep         method=falqon method.merge=topk_keep                   0.05
falqon_keep_sr      falqon_keep + method.merge_rounding=stochastic         0.05
falqon_carry        method=falqon method.merge=topk_carry                  0.1
falqon_all          method=falqon method.merge=every_row (the default)     0.125
falqon_all_every2   falqon_all + method.merge_every=2                      0.125
falqon_all_every4   falqon_all + method.merge_every=4                      0.125
==================  =====================================================  ========

Tasks: ``demo`` — the embedded default (synthetic ``shift`` task, exact match on 64 prompts);
``kjv`` — continuation of King James Bible verses (real text; build it first with
``python benchmarks/make_kjv_task.py``). Both at micro-batch 32, ZeRO-0, one process.

Reported per task: final eval loss and exact match per (variant, lr), each variant's best, its ratio
to the best LoRA run, the median step time (× the paper's), and the acceptance check of every
FALQON variant but the paper's (``--default`` marks the shipped one) at its default lr and at
0.5× / 2× of it: eval loss ≤ 1.02× / 1.05× the
best LoRA's (kjv), exact match ≥ 85% / 70% (demo), step time ≤ 1.05× the paper's. That step time
comes from a separate, paired comparison after the sweep (``--time-rounds`` processes, each
alternating ``--time-steps`` steps of the paper's and the default's trainer: the median ratio of
adjacent steps, see :func:`time_against_paper`), not from the sweep's parallel runs. Writes
``results.json``, ``results.md`` and ``results_<task>.png`` (eval loss and exact match against the
learning rate, log scale) into ``--out``, rewritten after every run. ``--jobs N`` runs N trainers at
once, each with ``OMP_NUM_THREADS`` = cores / N (step times then compare within one run only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: name -> (Hydra overrides, default learning rate)
VARIANTS: dict[str, tuple[list[str], float]] = {
    "lora": (["method=lora"], 3e-3),
    "falqon_paper": (["method=falqon", "method.merge=paper"], 0.1),
    "falqon_stochastic": (
        ["method=falqon", "method.merge=paper", "method.merge_rounding=stochastic"],
        0.1,
    ),
    "falqon_keep": (["method=falqon", "method.merge=topk_keep"], 0.05),
    "falqon_keep_sr": (
        ["method=falqon", "method.merge=topk_keep", "method.merge_rounding=stochastic"],
        0.05,
    ),
    "falqon_carry": (["method=falqon", "method.merge=topk_carry"], 0.1),
    "falqon_all": (["method=falqon", "method.merge=every_row"], 0.125),
    "falqon_all_every2": (
        ["method=falqon", "method.merge=every_row", "method.merge_every=2"],
        0.125,
    ),
    "falqon_all_every4": (
        ["method=falqon", "method.merge=every_row", "method.merge_every=4"],
        0.125,
    ),
}
KJV_DATA = common.REPO / "runs" / "kjv" / "kjv.jsonl"
#: name -> (Hydra overrides, acceptance metric, bound at the default lr, bound at 0.5x / 2x)
TASKS: dict[str, tuple[list[str], str, float, float]] = {
    "demo": (["train.micro_batch_size=32", "deepspeed.zero_stage=0"], "exact_match", 0.85, 0.70),
    "kjv": (
        [
            "data=jsonl",
            f"data.path={KJV_DATA}",
            "train.micro_batch_size=32",
            "deepspeed.zero_stage=0",
            "train.eval_samples=512",
            "train.eval_generate_samples=0",
        ],
        "x_best_lora",
        1.02,
        1.05,
    ),
}
#: Step time of the default variant against the paper's, at most.
STEP_TIME_BOUND = 1.05
#: Steps of each trainer before the paired step timing starts (compilation, allocator warm-up).
TIME_WARMUP = 5
QUICK = [
    "train.micro_batch_size=4",
    "model.max_length=64",
    "data.num_train=200",
    "data.num_eval=16",
    "train.eval_samples=16",
    "train.eval_generate_samples=8",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=["demo"], choices=list(TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--default",
        default="falqon_all",
        choices=list(VARIANTS),
        help="the variant whose acceptance is checked (FALQON's shipped default)",
    )
    p.add_argument("--jobs", type=int, default=1, help="trainer runs at once")
    p.add_argument(
        "--lr-scale",
        type=float,
        nargs="+",
        default=[0.3, 1.0, 3.0],
        help="multiples of each variant's lr",
    )
    p.add_argument(
        "--lr", action="append", default=[], metavar="VARIANT=VALUE", help="a variant's default lr"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every run"
    )
    p.add_argument(
        "--time-rounds",
        type=int,
        default=3,
        help="processes of the paired step-time comparison, default vs paper (0: none)",
    )
    p.add_argument("--time-steps", type=int, default=60, help="paired steps per timing process")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", type=Path, default=None, help="default runs/bench_learning/<timestamp>")
    p.add_argument("--quick", action="store_true", help="6 steps, tiny batches: " + " ".join(QUICK))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.base_lr = {name: lr for name, (_, lr) in VARIANTS.items()}
    for item in args.lr:
        name, sep, value = item.partition("=")
        if not sep or name not in VARIANTS:
            p.error(f"--lr expects VARIANT=VALUE with VARIANT in {list(VARIANTS)}, got {item!r}")
        args.base_lr[name] = float(value)
    if args.quick:
        args.steps, args.set = 6, QUICK + args.set
        args.time_steps = min(args.time_steps, 6)
    if any(s <= 0 for s in args.lr_scale):
        p.error("--lr-scale values must be positive")
    if args.time_rounds < 0 or args.time_steps < 5:
        p.error("--time-rounds must be >= 0 and --time-steps >= 5")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if "kjv" in args.tasks and not KJV_DATA.exists():
        p.error(
            f"the kjv task needs {KJV_DATA}: build it with `python benchmarks/make_kjv_task.py` (Debian's bible-kjv)"
        )
    args.out = (
        args.out or common.REPO / "runs" / "bench_learning" / time.strftime("%Y%m%d-%H%M%S")
    ).resolve()
    return args


def overrides_for(
    args: argparse.Namespace,
    task: str,
    variant: str,
    scale: float,
    run_dir: Path,
    *,
    steps: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The Hydra overrides of one trainer of ``variant`` at ``scale`` × its lr on ``task``."""
    lr = args.base_lr[variant] * scale
    return [
        *VARIANTS[variant][0],
        f"train.lr={lr:.6g}",
        f"train.max_steps={steps or args.steps}",
        f"run.dir={run_dir}",
        "train.save_every=0",
        "train.eval_every=0",
        "logger=none",
        *TASKS[task][0],
        *args.set,
        *extra,
    ]


def run_one(args: argparse.Namespace, task: str, variant: str, scale: float) -> dict[str, Any]:
    """One trainer run of ``variant`` at ``scale`` × its lr on ``task``; its final metrics as a row."""
    lr = args.base_lr[variant] * scale
    run_dir = args.out / task / f"{variant}_lr{lr:.3g}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = common.trainer_command(
        args.python, args.ranks, overrides_for(args, task, variant, scale, run_dir)
    )
    common.log(f"{task} {variant} lr={lr:.3g}: {' '.join(command)}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    code, output = common.run_trainer(command, args.timeout, env={"OMP_NUM_THREADS": str(threads)})
    row: dict[str, Any] = {"task": task, "variant": variant, "lr": lr, "scale": scale}
    if code != 0:
        row.update(status="failed", reason=common.failure_reason(output, code), tail=output[-2000:])
        return row
    records = common.read_run_metrics(run_dir)
    steps_done = [r for r in records if "step_time_s" in r]
    summary = common.run_summary(records, warmup=max(2, len(steps_done) // 10))
    row.update(
        status="ok",
        **{
            key: summary[key]
            for key in ("eval_loss", "eval_loss_before", "exact_match", "step_time_ms")
        },
        saturated_per_step=statistics.mean(r.get("saturated", 0) for r in steps_done[-50:])
        if steps_done
        else None,
    )
    return row


def time_against_paper(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """Step time of the default variant against the paper's, paired and free of the sweep's parallelism.

    ``--time-rounds`` processes of ``benchmarks/paired_steps.py``, each building both trainers (at
    their default lr, every core) and alternating their steps ``--time-steps`` times after
    ``TIME_WARMUP`` steps each. The ratio is the median over every pair of
    ``default step / paper step``: two steps a fraction of a second apart see the same machine, so
    its drift cancels (separate runs on these shared machines differed by ±20% from one run to the
    next). Reported too: each round's median pair ratio, the quartiles, the ratio of the medians.
    """
    variants = ["falqon_paper", args.default]
    times: dict[str, list[float]] = {name: [] for name in variants}
    per_round = []
    for round_ in range(args.time_rounds):
        folder = args.out / task / "timing" / f"round_{round_}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        spec = {
            "steps": args.time_steps,
            "warmup": TIME_WARMUP,
            "variants": {
                name: overrides_for(
                    args,
                    task,
                    name,
                    1.0,
                    folder / name,
                    steps=args.time_steps + TIME_WARMUP,
                    extra=["train.eval_samples=0", "train.eval_generate_samples=0"],
                )
                for name in variants
            },
        }
        (folder / "spec.json").write_text(json.dumps(spec, indent=1))
        command = [
            args.python,
            str(Path(__file__).with_name("paired_steps.py")),
            str(folder / "spec.json"),
            str(folder / "times.json"),
        ]
        common.log(
            f"{task} step timing, round {round_ + 1}/{args.time_rounds}: {' '.join(command)}"
        )
        code, output = common.run_trainer(
            command, args.timeout, env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        )
        if code != 0:
            return {
                "status": "failed",
                "variant": "+".join(variants),
                "reason": common.failure_reason(output, code),
            }
        measured = json.loads((folder / "times.json").read_text())["step_time_s"]
        pairs = [d / p for d, p in zip(measured[args.default], measured["falqon_paper"])]
        per_round.append(statistics.median(pairs))
        for name in variants:
            times[name] += [1e3 * t for t in measured[name]]
    pairs = [d / p for d, p in zip(times[args.default], times["falqon_paper"])]
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return {
        "status": "ok",
        "steps": args.time_steps,
        "rounds": args.time_rounds,
        "step_time_ms": times,
        "ratios": per_round,
        "ratio": statistics.median(pairs),
        "quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_medians": statistics.median(times[args.default])
        / statistics.median(times["falqon_paper"]),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant of one task: its best run, its ratio to the best LoRA run, step time × the paper's."""
    ok = [r for r in runs if r.get("status") == "ok"]
    best: dict[str, dict[str, Any]] = {}
    for r in ok:
        if r["variant"] not in best or r["eval_loss"] < best[r["variant"]]["eval_loss"]:
            best[r["variant"]] = r
    lora = best.get("lora", {}).get("eval_loss")
    paper_time = statistics.median(
        [r["step_time_ms"] for r in ok if r["variant"] == "falqon_paper"] or [math.nan]
    )
    out = {}
    for name, r in best.items():
        times = [x["step_time_ms"] for x in ok if x["variant"] == name]
        out[name] = {
            "best_lr": r["lr"],
            "eval_loss": r["eval_loss"],
            "exact_match": r["exact_match"],
            "x_best_lora": r["eval_loss"] / lora if lora else None,
            "step_time_x_paper": statistics.median(times) / paper_time
            if math.isfinite(paper_time)
            else None,
            "worst_exact_match_over_grid": min(
                (
                    x["exact_match"]
                    for x in ok
                    if x["variant"] == name and x["exact_match"] is not None
                ),
                default=None,
            ),
        }
    return out


def acceptance(
    task: str,
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    variant: str,
    timing: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A FALQON variant at 0.5x, 1x and 2x its default lr against the task's bounds; its step time
    against the paper's from ``timing`` (:func:`time_against_paper`) when that measured it, else from
    the sweep's runs."""
    metric, bound_default, bound_off = TASKS[task][1:]
    lora = summary.get("lora", {}).get("eval_loss")
    rows = []
    for scale in (0.5, 1.0, 2.0):
        run = next(
            (
                r
                for r in runs
                if r["variant"] == variant and r["scale"] == scale and r.get("status") == "ok"
            ),
            None,
        )
        bound = bound_default if scale == 1.0 else bound_off
        if run is None:
            rows.append({"scale": scale, "value": None, "bound": bound, "ok": None})
            continue
        if metric == "x_best_lora":
            value = run["eval_loss"] / lora if lora else None
            ok = None if value is None else value <= bound
        else:
            value = run["exact_match"]
            ok = None if value is None else value >= bound
        rows.append({"scale": scale, "lr": run["lr"], "value": value, "bound": bound, "ok": ok})
    step = summary.get(variant, {}).get("step_time_x_paper")
    if timing and timing.get("status") == "ok" and variant in timing["step_time_ms"]:
        step = timing["ratio"]
    rows.append(
        {
            "scale": None,
            "value": step,
            "bound": STEP_TIME_BOUND,
            "ok": None if step is None else step <= STEP_TIME_BOUND,
        }
    )
    return rows


def _task_markdown(payload: dict[str, Any], task: str) -> list[str]:
    scales = payload["config"]["lr_scale"]
    runs = [r for r in payload["runs"] if r["task"] == task]
    lines = [
        f"## Task `{task}`",
        "",
        "Final eval loss / exact match per learning rate (× the variant's default):",
        "",
    ]
    by_key = {(r["variant"], r["scale"]): r for r in runs}
    rows = []
    for name in payload["config"]["variants"]:
        cells = [name]
        for scale in scales:
            r = by_key.get((name, scale))
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append(f"{r['lr']:.3g}: failed")
            else:
                em = "—" if r["exact_match"] is None else f"{100 * r['exact_match']:.0f}%"
                cells.append(f"{r['lr']:.3g}: {r['eval_loss']:.3f} / {em}")
        rows.append(cells)
    lines.append(
        common.markdown_table(
            ["variant", *[f"lr × {s:g}" for s in scales]], rows, "l" + "r" * len(scales)
        )
    )
    summary = payload.get("summary", {}).get(task, {})
    if summary:
        lines += ["", "Best run of each variant:", ""]
        lines.append(
            common.markdown_table(
                [
                    "variant",
                    "best lr",
                    "eval loss",
                    "× best LoRA",
                    "exact match",
                    "worst EM on the grid",
                    "step time × paper",
                ],
                [
                    [
                        n,
                        f"{s['best_lr']:.3g}",
                        f"{s['eval_loss']:.3f}",
                        common.fmt(s["x_best_lora"], ".2f"),
                        common.fmt(s["exact_match"], ".3f"),
                        common.fmt(s["worst_exact_match_over_grid"], ".3f"),
                        common.fmt(s["step_time_x_paper"], ".2f"),
                    ]
                    for n, s in summary.items()
                ],
            )
        )
    timing = payload.get("timing", {}).get(task)
    if timing and timing.get("status") == "ok":
        default = payload["config"]["default"]
        paper_ms, default_ms = (
            timing["step_time_ms"]["falqon_paper"],
            timing["step_time_ms"][default],
        )
        low, high = timing["quartiles"]
        lines += [
            "",
            f"Step time, measured apart from the sweep ({timing['rounds']} rounds of {timing['steps']} paired "
            f"steps: both trainers in one process, their steps alternating, every core): falqon_paper "
            f"{statistics.median(paper_ms):.0f} ms, {default} {statistics.median(default_ms):.0f} ms (medians); "
            f"{default} / paper over every pair: median **{timing['ratio']:.3f}** (quartiles {low:.3f} – "
            f"{high:.3f}; per round {' · '.join(f'{r:.3f}' for r in timing['ratios'])}; ratio of the medians "
            f"{timing['ratio_of_medians']:.3f}). The acceptance's step time is the pair median; the table "
            "above is from the sweep's parallel runs.",
        ]
    elif timing:
        lines += ["", f"Step timing failed ({timing['variant']}): {timing['reason']}"]
    checks = payload.get("acceptance", {}).get(task, {})
    if checks:
        metric = TASKS[task][1]
        label, sign = (
            ("eval loss × best LoRA", "≤") if metric == "x_best_lora" else ("exact match", "≥")
        )
        bounds = checks[next(iter(checks))]
        lines += [
            "",
            f"Acceptance at each FALQON variant's lr × 0.5 / 1 / 2 ({label} {sign} {bounds[0]['bound']:g} / "
            f"{bounds[1]['bound']:g} / {bounds[2]['bound']:g}; step time × paper ≤ {STEP_TIME_BOUND:g}); "
            f"the shipped default is `{payload['config']['default']}`:",
            "",
        ]
        rows = []
        for variant, check in checks.items():
            cells = [variant + (" (default)" if variant == payload["config"]["default"] else "")]
            for c in check:
                verdict = "" if c["ok"] is None else (" ✓" if c["ok"] else " ✗")
                cells.append(common.fmt(c["value"], ".3f") + verdict)
            cells.append("pass" if all(c["ok"] for c in check) else "FAIL")
            rows.append(cells)
        lines.append(
            common.markdown_table(
                ["variant", "× 0.5", "× 1", "× 2", "step time × paper", ""], rows, "lrrrrl"
            )
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# falqon_dist learning benchmark (through launch/train.py)",
        "",
        f"`{payload['command']}`",
        "",
        f"{payload['config']['steps']} steps · overrides {' '.join(payload['config']['set']) or '—'} · "
        f"torch {payload['env']['torch']} · commit {payload['env']['commit']}",
        "",
    ]
    for task in payload["config"]["tasks"]:
        lines += _task_markdown(payload, task) + [""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], task: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.log("matplotlib is not installed: PNG skipped")
        return
    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(10, 4))
    for name in payload["config"]["variants"]:
        runs = sorted(
            (
                r
                for r in payload["runs"]
                if r["task"] == task and r["variant"] == name and r.get("status") == "ok"
            ),
            key=lambda r: r["lr"],
        )
        if not runs:
            continue
        lrs = [r["lr"] for r in runs]
        ax_loss.plot(lrs, [r["eval_loss"] for r in runs], marker="o", label=name)
        if all(r["exact_match"] is not None for r in runs):
            ax_em.plot(lrs, [100 * r["exact_match"] for r in runs], marker="o", label=name)
    for ax, label in ((ax_loss, "final eval loss"), (ax_em, "exact match (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{task}: {label}", fontsize=9)
        ax.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:  # none before the task's first run finished
        ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(payload: dict[str, Any]) -> str:
    out = Path(payload["out"])
    payload["summary"], payload["acceptance"] = {}, {}
    for task in payload["config"]["tasks"]:
        runs = [r for r in payload["runs"] if r["task"] == task]
        payload["summary"][task] = summarize(runs)
        payload["acceptance"][task] = {
            variant: acceptance(
                task, runs, payload["summary"][task], variant, payload.get("timing", {}).get(task)
            )
            for variant in payload["config"]["variants"]
            if variant.startswith("falqon") and variant != "falqon_paper"
        }
        plot(payload, task, out / f"results_{task}.png")
    common.write_json(out / "results.json", payload)
    text = markdown(payload)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_learning.py " + " ".join(args.argv),
        "out": str(args.out),
        "env": common.environment(torch.device("cpu")),
        "config": {
            "tasks": args.tasks,
            "variants": args.variants,
            "default": args.default,
            "lr_scale": args.lr_scale,
            "base_lr": args.base_lr,
            "steps": args.steps,
            "set": args.set,
            "ranks": args.ranks,
            "jobs": args.jobs,
        },
        "runs": [],
    }
    grid = [(t, v, s) for t in args.tasks for v in args.variants for s in args.lr_scale]
    bar = common.progress(None, "runs", "run", total=len(grid))
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # results in grid order, in this thread
        for row in pool.map(lambda item: run_one(args, *item), grid):
            payload["runs"].append(row)
            write_reports(payload)
            bar.update(1)
    bar.close()
    if args.time_rounds:
        payload["timing"] = {}
        for task in common.progress(args.tasks, "step timing", "task"):
            payload["timing"][task] = time_against_paper(args, task)
            write_reports(payload)
    return common.finish(payload, write_reports)


if __name__ == "__main__":
    main()
