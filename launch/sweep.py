#!/usr/bin/env python
"""Grid sweeps, one DeepSpeed job per combination.

Hydra's ``--multirun`` cannot be used under ``deepspeed``: every rank would run the whole sweep,
and the ranks of one job would start different combinations. This script expands the grid itself and
launches one multi-rank job per point, sequentially, each in its own run directory.

    python launch/sweep.py --num-gpus 2 --grid method.rank=8,16,32 train.lr=0.05,0.1 -- train.max_steps=200
    python launch/sweep.py --hostfile launch/hostfile.example --grid method=falqon,lora -- model=llama3_8b ...
    python launch/sweep.py --launcher-args "--master_port 29600 --include localhost:2,3" --grid train.lr=0.1,0.2
    ONE='[{path: a.jsonl, format: chat, weight: 1}]' TWO='[{path: a.jsonl, format: chat}, {path: b/, format: text}]'
    python launch/sweep.py --grid "data.sources=$ONE,$TWO" -- data=mix

``--launcher-args`` are passed to the ``deepspeed`` launcher of every job (its own flags: ports,
``--include``/``--exclude``, ``--launcher pdsh|slurm|...``). ``--grid`` takes ``key=v1,v2,...`` axes
(a comma inside brackets or braces belongs to its value: lists are values too); everything after
``--`` is passed to every job. Jobs go to ``<root>/<name>/<key-value_key-value...>`` (a long name is
cut and ends with a hash of the whole; two points whose names would be the same, such as ``[a,b]``
and ``[a, b]``, each get a hash of their exact overrides appended: every point has its own
directory); a failed job is reported and the sweep goes on (``--stop-on-error`` stops it). Prints a
table of final eval metrics read from each job's metrics.jsonl. Running a sweep again into the same
``--root``/``--name`` finds its run directories used: each job is refused unless ``-- train.resume=true``
(continue them) or ``-- run.overwrite=true`` (start over, the old runs moved aside).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def split_values(values: str) -> list[str]:
    """``"1,[a,b],{x: 1, y: 2}"`` → ``["1", "[a,b]", "{x: 1, y: 2}"]``: commas inside brackets, braces
    or quotes belong to a value (a list such as ``data.sources``), the others separate values."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(values):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    if depth or quote:
        raise SystemExit(f"--grid values {values!r}: unbalanced brackets or quotes")
    return [*parts, values[start:]]


def expand(axes: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x"]`` → ``[["a=1", "b=x"], ["a=2", "b=x"]]`` (see :func:`split_values`)."""
    parsed = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid axis {axis!r} must look like key=v1,v2")
        parsed.append([f"{key}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*parsed)]


def run_label(combo: list[str]) -> str:
    """A directory name for one combination: ``method-lora_train.lr-0.1``, each override normalized
    to letters, digits and ``.+-`` (a Hydra override value must not hold ``,``, ``=``, brackets or
    spaces, and neither may a path component hold ``/``), none starting or ending with ``-`` or
    ``.`` (so no label is ``.``, ``..`` or hidden), joined by ``_``. Different
    combinations may get the same label (``[a,b]`` and ``[a, b]``): :func:`run_labels` tells them apart."""
    # "k=[a, b]" -> "k-a-b"
    parts = (re.sub(r"[^\w.+-]+", "-", override).strip("-.") for override in combo)
    label = "_".join(part for part in parts if part) or "run"
    if len(label) > 100:
        label = f"{label[:80]}-{hashlib.sha1('_'.join(combo).encode()).hexdigest()[:10]}"
    return label


def _digest(combo: list[str], length: int) -> str:
    """A hash of the exact override strings of ``combo`` (NUL-separated: no two lists join alike),
    the same on every machine and run."""
    return hashlib.sha1("\0".join(combo).encode()).hexdigest()[:length]


def run_labels(combos: list[list[str]]) -> list[str]:
    """One label per combination, all different: :func:`run_label`, and where several combinations
    share one (compared ignoring case, as macOS file systems do), a short hash of each one's exact
    overrides appended to each of them. Deterministic: the same grid gives the same directories.
    A combination given twice is refused (it would run twice into one directory)."""
    seen: set[tuple[str, ...]] = set()
    for combo in combos:
        if tuple(combo) in seen:
            raise SystemExit(
                f"--grid: the combination {' '.join(combo)} appears twice (a value repeated in an axis?)"
            )
        seen.add(tuple(combo))
    base = [run_label(combo) for combo in combos]
    for length in (8, 16, 40):
        counts: dict[str, int] = {}
        for label in base:
            counts[label.casefold()] = counts.get(label.casefold(), 0) + 1
        labels = [
            f"{label}-{_digest(combo, length)}" if counts[label.casefold()] > 1 else label
            for label, combo in zip(base, combos)
        ]
        if len({label.casefold() for label in labels}) == len(labels):
            return labels
    # reached only on a sha1 collision
    raise SystemExit("--grid: cannot give every combination its own directory name")


def final_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval_loss"' in line]
    return evals[-1] if evals else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", nargs="+", required=True, help="axes key=v1,v2,...")
    parser.add_argument("--num-gpus", type=int, default=2, help="ranks per job on this node")
    parser.add_argument("--hostfile", help="multi-node DeepSpeed hostfile (overrides --num-gpus)")
    parser.add_argument(
        "--launcher-args", default="", help="flags for the deepspeed launcher, one quoted string"
    )
    parser.add_argument("--root", default="runs/sweeps")
    parser.add_argument("--name", default="sweep")
    parser.add_argument("--stop-on-error", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args, rest = parser.parse_known_args()
    common = [a for a in rest if a != "--"]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    flags = shlex.split(args.launcher_args)
    # --num_gpus only when --launcher-args selects no devices itself (deepspeed refuses both)
    choose = not any(f.split("=")[0] in ("--include", "--exclude", "--num_gpus") for f in flags)
    launcher = (
        [deepspeed, "--hostfile", args.hostfile]
        if args.hostfile
        else [deepspeed] + (["--num_gpus", str(args.num_gpus)] if choose else [])
    )
    launcher += flags
    results = []
    combos = expand(args.grid)
    for combo, label in zip(combos, run_labels(combos)):
        run_dir = (REPO / args.root / args.name / label).resolve()
        cmd = [*launcher, str(REPO / "launch" / "train.py"), *common, *combo, f"run.dir={run_dir}"]
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            continue
        code = subprocess.run(cmd, cwd=REPO).returncode
        results.append((combo, code, final_metrics(run_dir)))
        if code != 0 and args.stop_on_error:
            break
    if results:
        print("\n| combination | exit | eval_loss | eval_exact_match |\n|---|---:|---:|---:|")
        for combo, code, metrics in results:
            loss, exact = metrics.get("eval_loss", "—"), metrics.get("eval_exact_match", "—")
            print(f"| {' '.join(combo)} | {code} | {loss} | {exact} |")
    sys.exit(max((code for _, code, _ in results), default=0))


if __name__ == "__main__":
    main()
