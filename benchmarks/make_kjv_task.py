#!/usr/bin/env python
"""Build a real-text fine-tuning task: continue a King James Bible verse (public domain).

    apt-get install bible-kjv                       # Debian's package: the text and its `bible` reader
    python benchmarks/make_kjv_task.py              # -> runs/kjv/kjv.jsonl (about 2 MB, not committed)
    python benchmarks/bench_learning.py --set data=jsonl data.path=runs/kjv/kjv.jsonl ...

Every verse whose text has ``--min-chars``..``--max-chars`` characters (the embedded tiny model reads
characters: ``model.max_length`` 128 must hold prompt + response) becomes one JSONL row: the prompt is
the book and verse reference and the first half of its words, the response the second half. The
verses are shuffled with ``--seed`` (the trainer's ``data.eval_fraction`` then holds out its share).
The text comes from Debian's ``bible-kjv`` (``bible -f Ge1:1-Re22:21`` prints all 31,102 verses).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSE = re.compile(r"^(?P<ref>[1-3]?[A-Za-z]+\d+:\d+) (?P<text>.+)$")


def read_verses() -> list[tuple[str, str]]:
    """All ``(reference, text)`` pairs from Debian's ``bible`` reader."""
    if shutil.which("bible") is None:
        sys.exit(
            "the `bible` command is missing: install Debian's bible-kjv package (apt-get install bible-kjv)"
        )
    output = subprocess.run(
        ["bible", "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True
    ).stdout
    verses = []
    for line in output.splitlines():
        match = VERSE.match(line.strip())
        if match:
            verses.append((match["ref"], match["text"]))
    if len(verses) < 30000:
        sys.exit(
            f"`bible` printed {len(verses)} verses; expected 31,102 (is bible-kjv-text installed?)"
        )
    return verses


def rows(verses: list[tuple[str, str]], min_chars: int, max_chars: int) -> list[dict[str, str]]:
    out = []
    for ref, text in verses:
        if not min_chars <= len(text) <= max_chars:
            continue
        words = text.split()
        half = len(words) // 2
        out.append(
            {"prompt": f"{ref} {' '.join(words[:half])}", "response": " " + " ".join(words[half:])}
        )
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "kjv" / "kjv.jsonl")
    parser.add_argument("--min-chars", type=int, default=40)
    parser.add_argument("--max-chars", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = rows(read_verses(), args.min_chars, args.max_chars)
    random.Random(args.seed).shuffle(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} verse continuations -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
