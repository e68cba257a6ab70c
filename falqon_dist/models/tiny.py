"""The embedded default base model: a tiny Llama shipped in the package, loaded straight from it.

No model hub is reachable at run time, so the project ships its own base (``tiny_weights/``,
3.6 MB): a character-level tokenizer (:mod:`falqon_dist.models.tokenizer`) and a small
``LlamaForCausalLM`` whose linear layers all have dimensions that are multiples of 16 (FALQON
converts every one but the LM head), pretrained on the pretraining tasks of
:mod:`falqon_dist.data.synthetic` (:mod:`falqon_dist.models.pretrain`; it learns copy / reverse /
the world facts well, addition poorly). The held-out tasks (``shift`` by default, ``sort``, ``sub``)
are what fine-tuning then has to learn. Pretraining depends on the CPU kind (float summation order),
so every machine fine-tunes the shipped bytes, never a local rebuild.

The package directory is a Hugging Face model directory: :func:`build_tiny_model` returns it after
checking it (each file's SHA-256 against the build's ``falqon_build.json``: a file changed or not
fully installed, e.g. a Git LFS pointer, is one error naming it). Nothing is copied or written.
``python -m falqon_dist.models.tiny --regenerate`` pretrains anew and replaces the shipped files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from falqon_dist.models.tokenizer import build_tiny_tokenizer

#: Bump when the tokenizer, architecture, corpus or recipe changes (then regenerate the shipped build).
TINY_VERSION = "v1"
TINY_NAME = f"tiny-llama-{TINY_VERSION}"
#: The build's record, written last by a build: name, recipe fingerprint, and every file's SHA-256.
BUILD_INFO = "falqon_build.json"
#: The shipped build (a model directory ``from_pretrained`` loads as it is).
SHIPPED_DIR = Path(__file__).with_name("tiny_weights")


class TinyModelError(RuntimeError):
    """The shipped tiny model's files are missing or differ from its build record; the message names the file."""


def tiny_config(vocab_size: int | None = None) -> LlamaConfig:
    """Architecture of the tiny model; ``vocab_size`` defaults to the tiny tokenizer's, rounded to 16."""
    if vocab_size is None:
        vocab_size = 16 * math.ceil(len(build_tiny_tokenizer()) / 16)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def file_digests(directory: Path) -> dict[str, str]:
    """``{file name: SHA-256}`` of every file of a build directory but its build record."""
    files = [
        path
        for path in sorted(Path(directory).iterdir())
        if path.is_file() and path.name != BUILD_INFO
    ]
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def check_build(directory: Path) -> dict[str, Any]:
    """The build record of ``directory``, after checking that every file it lists is there with its
    recorded SHA-256 (:class:`TinyModelError` naming the first that is not)."""
    directory = Path(directory)
    record = directory / BUILD_INFO
    try:
        info = json.loads(record.read_text())
        recorded = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise TinyModelError(f"{record}: unreadable build record ({problem}); {_REMEDY}") from None
    for name, digest in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            raise TinyModelError(f"{path}: missing from the tiny model; {_REMEDY}")
        found = hashlib.sha256(path.read_bytes()).hexdigest()
        if found != digest:
            raise TinyModelError(
                f"{path}: SHA-256 {found[:12]}… differs from the build's {digest[:12]}… "
                f"(changed, truncated, or a Git LFS pointer?); {_REMEDY}"
            )
    return info


_REMEDY = "reinstall falqon_dist, or rebuild the shipped model with `python -m falqon_dist.models.tiny --regenerate`"


def build_tiny_model() -> Path:
    """The directory of the embedded tiny model: the package's own, checked (:func:`check_build`).

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    Reads the files only (any number of processes at once); writes nothing.
    """
    check_build(SHIPPED_DIR)
    return SHIPPED_DIR


def default_cache_dir() -> Path:
    """``$FALQON_CACHE`` or ``~/.cache/falqon_dist`` (the tiny model itself is never copied there)."""
    return Path(
        os.environ.get("FALQON_CACHE") or Path.home() / ".cache" / "falqon_dist"
    ).expanduser()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="The embedded tiny model: check it, or regenerate the shipped files."
    )
    parser.add_argument(
        "--regenerate", action="store_true", help=f"pretrain anew and replace {SHIPPED_DIR}"
    )
    if parser.parse_args().regenerate:
        from falqon_dist.models.pretrain import regenerate_shipped

        print(regenerate_shipped())
    else:
        print(build_tiny_model())
