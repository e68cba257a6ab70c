"""The tiny model's pretraining recipe: what ``python -m falqon_dist.models.tiny --regenerate`` runs.

A fixed number of single-thread AdamW steps (~1000, 60-90 s on 2 CPU cores) on the synthetic
pretraining corpus (:data:`falqon_dist.data.synthetic.PRETRAIN_MIX`). Its result depends on the CPU
kind (float summation order), which is why the package ships one build's files
(:data:`falqon_dist.models.tiny.SHIPPED_DIR`) and every run loads those. The build record
(``falqon_build.json``) holds the :func:`recipe_fingerprint` (a test fails when the recipe changes
and the shipped files were not regenerated) and every file's SHA-256 (checked at load).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from falqon_dist.data.collate import Collator
from falqon_dist.data.synthetic import PRETRAIN_MIX, pretrain_corpus
from falqon_dist.data.tokenization import tokenize_records
from falqon_dist.models.tiny import (
    BUILD_INFO,
    SHIPPED_DIR,
    TINY_NAME,
    TINY_VERSION,
    file_digests,
    tiny_config,
)
from falqon_dist.models.tokenizer import build_tiny_tokenizer


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


def recipe_fingerprint(settings: PretrainSettings | None = None) -> str:
    """Short hash of everything that determines the build: version, architecture, corpus, recipe."""
    recipe: dict[str, Any] = {
        "version": TINY_VERSION,
        "config": tiny_config().to_dict(),
        "mix": PRETRAIN_MIX,
        "vocab": build_tiny_tokenizer().get_vocab(),
        "pretrain": asdict(settings or PretrainSettings()),
    }
    recipe["config"].pop("transformers_version", None)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
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


def pretrain_into(directory: Path, settings: PretrainSettings) -> dict[str, Any]:
    """Pretrain the tiny model and write it into ``directory`` with its build record; returns the record."""
    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(tiny_config())
    num_params = sum(p.numel() for p in model.parameters())
    _log(f"building {TINY_NAME}: {num_params / 1e6:.2f}M parameters, {settings.steps} CPU steps")
    with _single_thread():
        losses = pretrain(model, tokenizer, settings)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
        "files": file_digests(directory),
    }
    (Path(directory) / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    _log(f"built {TINY_NAME} in {info['seconds']} s (final response loss {info['final_loss']:.3f})")
    return info


def regenerate_shipped() -> Path:
    """Pretrain the tiny model here and replace the shipped files with the result."""
    with tempfile.TemporaryDirectory() as tmp:
        pretrain_into(Path(tmp), PretrainSettings())
        if SHIPPED_DIR.exists():
            shutil.rmtree(SHIPPED_DIR)
        shutil.copytree(tmp, SHIPPED_DIR)
    return SHIPPED_DIR
