#!/usr/bin/env python
"""Fill ``wheels/`` with what an offline GPU machine lacks to run the real trainer (``make wheels``).

That machine has torch (CUDA), transformers, peft and pytest but no package registry and no
DeepSpeed, Hydra or bitsandbytes; ``launch/gpu_check.sh`` installs from ``wheels/`` with
``--no-index`` whatever does not import. Versions are the ones installed in this ``.venv`` (so the
GPU runs the code CI tested). Pure-Python packages are built or downloaded once (``py3-none-any``);
packages with native code are downloaded for each Python version in ``--pythons`` (the device's
Python is not known in advance). The folder must stay within the device's 64 MiB carry limit;
the total is printed and checked.

    python launch/make_wheels.py                      # -> wheels/
    python launch/make_wheels.py --pythons 3.12 --out /tmp/wheels
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Pure Python: one wheel serves every interpreter (DeepSpeed is an sdist on PyPI: built here,
#: without its CUDA ops, which it JIT-builds on the GPU machine when asked to).
PURE = [
    "deepspeed",
    "hjson",
    "py-cpuinfo",
    "einops",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "pydantic",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "pytest",
    "iniconfig",
    "pluggy",
]
#: Native code: one wheel per Python version (bitsandbytes and ninja are version-independent).
NATIVE = ["pydantic-core", "msgpack", "psutil", "ninja", "bitsandbytes"]
PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_28_x86_64",
]
LIMIT_BYTES = 64 * 2**20


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "wheels")
    parser.add_argument("--pythons", nargs="+", default=["3.10", "3.11", "3.12", "3.13"])
    parser.add_argument(
        "--no-bitsandbytes",
        action="store_true",
        help="leave out bitsandbytes (41 MB: the qlora rows)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    native = [n for n in NATIVE if not (args.no_bitsandbytes and n == "bitsandbytes")]
    pip("wheel", "--quiet", "--no-deps", "-w", str(args.out), *(pinned(n) for n in PURE))
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    for version in args.pythons:
        pip(
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--python-version",
            version,
            *platform_args,
            "-d",
            str(args.out),
            *(pinned(n) for n in native),
        )
    total = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")
    if total > LIMIT_BYTES:
        sys.exit(
            f"{args.out} holds {total / 2**20:.1f} MiB: over the device's 64 MiB carry limit "
            "(use --pythons with the device's version only, or --no-bitsandbytes)"
        )


if __name__ == "__main__":
    main()
