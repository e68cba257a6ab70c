"""The embedded default base model: a tiny Llama pretrained locally on the synthetic corpus.

No model hub is reachable at run time, so the project builds its own base: a character-level
tokenizer (:mod:`falqon_dist.models.tokenizer`) and a small ``LlamaForCausalLM`` (all linear layers
have dimensions that are multiples of 16, so FALQON converts every one but the LM head), pretrained
on CPU for a fixed number of AdamW steps on the pretraining tasks of
:mod:`falqon_dist.data.synthetic` (it learns copy / reverse / the world facts well, addition
poorly). The held-out tasks (``shift`` by default, ``sort``, ``sub``) are what fine-tuning then has
to learn. Pretraining takes ~1000 single-thread AdamW steps (60-90 s on 2 CPU cores) and its result
depends on the CPU kind (float summation order): the package therefore ships the weights one build
produced (``tiny_weights/``, 3.6 MB), and a build copies them when they match the recipe, so every
machine fine-tunes the same bytes. ``python -m falqon_dist.models.tiny --regenerate`` pretrains anew
and replaces them.

:func:`build_tiny_model` builds it once and caches it under ``$FALQON_CACHE`` (default
``~/.cache/falqon_dist``) in a versioned directory. The build goes to a temporary directory that is
moved into place with ``os.replace``, under an exclusive ``fcntl.flock`` on a lock file beside it:
when two processes (e.g. two ranks) ask at once, one builds and the other waits, then reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from falqon_dist.data.collate import Collator
from falqon_dist.data.synthetic import PRETRAIN_MIX, pretrain_corpus
from falqon_dist.data.tokenization import tokenize_records
from falqon_dist.models.tokenizer import build_tiny_tokenizer

#: Bump when the tokenizer, architecture, corpus or recipe changes: a new version builds a new dir.
TINY_VERSION = "v1"
TINY_NAME = f"tiny-llama-{TINY_VERSION}"
#: Written last into a finished build; a directory is reused only when this file exists and records
#: the current recipe fingerprint (a changed recipe rebuilds, even under the same version).
BUILD_INFO = "falqon_build.json"


@dataclass(frozen=True)
class PretrainSettings:
    """The fixed pretraining recipe of the tiny model."""

    #: AdamW steps, sequences per step, peak learning rate (linear warm-up, cosine decay to 10%).
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    #: Seed of the corpus and of torch (initialization).
    seed: int = 0
    #: Tokens per sequence (pretraining records are ~20 tokens).
    max_length: int = 64


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


def recipe_fingerprint(settings: PretrainSettings | None = None) -> str:
    """Short hash of everything that determines the build: version, architecture, corpus, recipe."""
    recipe = {
        "version": TINY_VERSION,
        "config": tiny_config().to_dict(),
        "mix": PRETRAIN_MIX,
        "vocab": build_tiny_tokenizer().get_vocab(),
        "pretrain": asdict(settings or PretrainSettings()),
    }
    recipe["config"].pop("transformers_version", None)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_current(target: Path, fingerprint: str) -> bool:
    try:
        return json.loads((target / BUILD_INFO).read_text()).get("recipe") == fingerprint
    except (OSError, ValueError):
        return False


def default_cache_dir() -> Path:
    """``$FALQON_CACHE`` or ``~/.cache/falqon_dist``."""
    return Path(os.environ.get("FALQON_CACHE") or Path.home() / ".cache" / "falqon_dist").expanduser()


def _log(message: str) -> None:
    print(f"[falqon_dist] {message}", file=sys.stderr, flush=True)


def _progress(total: int) -> Iterator[int]:
    """Step indices with a tqdm bar on a TTY, else a log line every 10%."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(range(total), desc="pretraining tiny model", file=sys.stderr)
        return
    for step in range(total):
        if step % max(total // 10, 1) == 0:
            _log(f"pretraining tiny model: step {step}/{total}")
        yield step


def pretrain(model: LlamaForCausalLM, tokenizer, settings: PretrainSettings) -> list[float]:
    """Pretrain ``model`` in place on the synthetic pretraining corpus; returns per-step losses."""
    records = pretrain_corpus(settings.steps * settings.batch_size, seed=settings.seed)
    examples, _ = tokenize_records(records, tokenizer, settings.max_length)
    collate = Collator(tokenizer.pad_token_id)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in _progress(settings.steps):
        batch = collate(examples[step * settings.batch_size : (step + 1) * settings.batch_size])
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: same floating-point reductions on any core count (a reproducible build),
    and no OpenMP spin-waiting when other processes share the cores (2 threads on 2 busy cores ran
    this model ~15x slower here; on 2 idle cores 1 thread costs ~1.7x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: The tiny model as built by the recipe, shipped with the package (3.6 MB) so that every machine
#: starts from the same bytes: a build on another CPU kind differs (float summation order), and
#: FALQON's results amplify the difference. ``python -m falqon_dist.models.tiny --regenerate``
#: rebuilds it by pretraining and replaces these files.
SHIPPED_DIR = Path(__file__).with_name("tiny_weights")


def _shipped_info(settings: PretrainSettings) -> dict | None:
    """The shipped build's info when it exists and matches the current recipe, else None."""
    try:
        info = json.loads((SHIPPED_DIR / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("recipe") == recipe_fingerprint(settings) else None


def _build_into(directory: Path, settings: PretrainSettings, *, pretrain_anew: bool = False) -> dict:
    """Fill ``directory`` with the tiny model: a copy of the shipped build, or (``pretrain_anew``,
    or no shipped build of this recipe) the result of pretraining it here."""
    info = None if pretrain_anew else _shipped_info(settings)
    if info is not None:
        for item in SHIPPED_DIR.iterdir():
            shutil.copy2(item, directory / item.name)
        _log(f"{TINY_NAME}: using the shipped weights ({SHIPPED_DIR})")
        return info
    return _pretrain_into(directory, settings)


def _pretrain_into(directory: Path, settings: PretrainSettings) -> dict:
    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(tiny_config())
    num_params = sum(p.numel() for p in model.parameters())
    _log(f"building {TINY_NAME}: {num_params / 1e6:.2f}M parameters, {settings.steps} CPU steps")
    with _single_thread():
        losses = pretrain(model, tokenizer, settings)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tail = losses[-20:]
    info = {
        "name": TINY_NAME,
        "recipe": recipe_fingerprint(settings),
        "parameters": num_params,
        "pretrain": asdict(settings),
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    _log(f"built {TINY_NAME} in {info['seconds']} s (final response loss {info['final_loss']:.3f})")
    return info


#: How long a process waits for another one's build of the tiny model, and how often it says so.
BUILD_WAIT_S, BUILD_NOTICE_S = 600.0, 10.0


@contextlib.contextmanager
def _exclusive(lock_path: Path, wait_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """Hold ``lock_path`` exclusively (``flock``: the kernel releases it if its holder dies, so it is
    never stale); while another process holds it, say so every few seconds, and give up after
    ``wait_s``."""
    with open(lock_path, "a+") as handle:
        start = time.monotonic()
        notice = start - BUILD_NOTICE_S  # the first refusal is reported at once
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > wait_s:
                    raise TimeoutError(
                        f"another process has been building {TINY_NAME} for over {wait_s:.0f}s (lock {lock_path}); "
                        f"is it stuck? (the lock is released when that process exits)"
                    ) from None
                if time.monotonic() - notice >= BUILD_NOTICE_S:
                    _log(f"another process is building {TINY_NAME}; waited {waited:.0f}s for {lock_path}")
                    notice = time.monotonic()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_tiny_model(cache_dir: str | Path | None = None, *, force: bool = False, pretrain_anew: bool = False) -> Path:
    """Directory of the tiny base model (built on first use; ``force`` rebuilds).

    The build copies the shipped weights (:data:`SHIPPED_DIR`) when they match the recipe, so every
    machine gets the same bytes; ``pretrain_anew`` (with ``force``) pretrains them here instead.

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    Safe to call from several processes at once (see module docstring).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / TINY_NAME
    settings = PretrainSettings()
    fingerprint = recipe_fingerprint(settings)
    if not force and _is_current(target, fingerprint):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{TINY_NAME}.lock"):
        if not force and _is_current(target, fingerprint):  # built by another process while we waited
            return target
        if target.exists() and not force:
            _log(f"{target} is incomplete or from another recipe; rebuilding it")
        staging = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}.tmp-", dir=root))
        try:
            staging.chmod(0o755)
            _build_into(staging, settings, pretrain_anew=pretrain_anew)
            if target.exists():  # forced rebuild, stale recipe, or an incomplete crashed build
                stale = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}.old-", dir=root))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def regenerate_shipped() -> Path:
    """Pretrain the tiny model here and replace the shipped weights with the result."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _pretrain_into(directory, PretrainSettings())
        if SHIPPED_DIR.exists():
            shutil.rmtree(SHIPPED_DIR)
        shutil.copytree(directory, SHIPPED_DIR)
    return SHIPPED_DIR


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The embedded tiny model: build the cache, or regenerate the shipped weights.")
    parser.add_argument("--regenerate", action="store_true", help=f"pretrain anew and replace {SHIPPED_DIR}")
    cli = parser.parse_args()
    print(regenerate_shipped() if cli.regenerate else build_tiny_model())
