"""Fine-tuning data: sources, prompt-masked tokenization, packing, batching, generation-based eval.

Public API::

    from falqon_dist.data import DataConfig, build_data, evaluate_exact_match
    bundle = build_data(DataConfig(name="synthetic", task="sub"), tokenizer)
    sampler = bundle.train_batch_sampler(batch_size=32, num_replicas=world, rank=rank)
    loader = DataLoader(bundle.train, batch_sampler=sampler, collate_fn=bundle.collate_fn)
    # call the model with use_cache=False in training (needed for per-example attention when packing)
    em = evaluate_exact_match(model, tokenizer, bundle.eval_records)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from falqon_dist.data.collate import Collator, TrainBatchSampler, pack_examples
from falqon_dist.data.config import DATASET_NAMES, DataConfig, DataSource
from falqon_dist.data.formats import DataFormatError, Record
from falqon_dist.data.generation import evaluate_exact_match, generate_answers, mean_response_loss
from falqon_dist.data.mixing import MixShare, interleave
from falqon_dist.data.sources import load_mixture, load_records, split_records
from falqon_dist.data.synthetic import exact_match, finetune_splits
from falqon_dist.data.tokenization import (
    IGNORE_INDEX,
    TokenizedDataset,
    TokenizeStats,
    special_ids,
    tokenize_records,
)


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side."""

    #: Tokenized training examples (packed rows when DataConfig.packing).
    train: TokenizedDataset
    #: Tokenized eval examples, one per row (never packed), for eval loss.
    eval: TokenizedDataset
    #: Pads a list of items into a batch: input_ids, labels, and attention_mask (unpacked) or
    #: position_ids (packed).
    collate_fn: Collator
    #: Raw eval records ({"prompt", "response"} for exact match, or conversations / texts).
    eval_records: list[Record]
    #: Tokenization counts (truncated / dropped examples) of the train and eval splits.
    train_stats: TokenizeStats
    eval_stats: TokenizeStats
    #: Whether ``train`` holds packed rows.
    packing: bool
    #: Seed of the batch order.
    seed: int
    #: data=mix: what each source gave to the mixture (empty otherwise).
    mixture: tuple[MixShare, ...] = ()
    #: data=mix: the source (index into ``mixture``) of every eval row, for per-source eval loss.
    eval_groups: tuple[int, ...] = ()

    def train_batch_sampler(
        self, batch_size: int, *, num_replicas: int = 1, rank: int = 0, drop_last: bool = False
    ) -> TrainBatchSampler:
        """Shuffled batches of this rank's share (grouped by length unless packed)."""
        return TrainBatchSampler(
            self.train.lengths,
            batch_size,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.seed,
            group_by_length=not self.packing,
            drop_last=drop_last,
        )


def load_split_records(cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """Normalized ``(train, eval)`` records for ``cfg`` (synthetic or file/hub dataset)."""
    if cfg.name == "synthetic":
        return finetune_splits(cfg.task, cfg.num_train, cfg.num_eval, cfg.seed)
    return load_records(cfg)


def build_data(cfg: DataConfig, tokenizer) -> DataBundle:
    """Load, normalize, tokenize (loss on responses only) and optionally pack the data of ``cfg``."""
    if cfg.max_length is None:
        raise ValueError(
            "DataConfig.max_length is None: set it (the trainer sets it from model.max_length)"
        )
    mixture = load_mixture(cfg) if cfg.name == "mix" else None
    train_records, eval_records = (
        (mixture.train, mixture.eval) if mixture else load_split_records(cfg)
    )
    _, pad_id = special_ids(tokenizer)
    train_examples, train_stats = tokenize_records(
        train_records, tokenizer, cfg.max_length, train_on_inputs=cfg.train_on_inputs
    )
    eval_groups: tuple[int, ...] = ()
    if mixture is None and not eval_records:  # one text corpus: hold out windows, before packing
        train_examples, eval_examples = split_records(
            train_examples, cfg.eval_fraction, cfg.seed, where=f"{cfg.path} (its windows)"
        )
        eval_stats = TokenizeStats(total=len(eval_examples), kept=len(eval_examples))
        eval_records = [
            {"text": tokenizer.decode(example["input_ids"])} for example in eval_examples
        ]
    elif mixture is None:
        # eval: the outputs
        eval_examples, eval_stats = tokenize_records(eval_records, tokenizer, cfg.max_length)
    else:
        eval_examples, eval_groups, eval_stats = _tokenize_eval_parts(
            mixture.eval_parts, tokenizer, cfg.max_length
        )
    if not train_examples or not eval_examples:
        raise ValueError(
            f"no examples fit max_length={cfg.max_length}: "
            f"train kept {train_stats.kept}/{train_stats.total}, "
            f"eval kept {eval_stats.kept}/{eval_stats.total}; raise model.max_length "
            f"(DataConfig.max_length when calling build_data yourself)"
        )
    if cfg.packing:
        train_examples = pack_examples(train_examples, cfg.max_length)
    return DataBundle(
        train=TokenizedDataset(train_examples),
        eval=TokenizedDataset(eval_examples),
        collate_fn=Collator(pad_id),
        eval_records=list(eval_records),
        train_stats=train_stats,
        eval_stats=eval_stats,
        packing=cfg.packing,
        seed=cfg.seed,
        mixture=mixture.shares if mixture else (),
        eval_groups=eval_groups,
    )


def _tokenize_eval_parts(parts, tokenizer, max_length: int):
    """Each source's eval records tokenized on its own, the examples interleaved across sources (as
    the records are), with the source index of every example and the summed counts."""
    tokenized = [tokenize_records(part, tokenizer, max_length) for part in parts]
    tagged = interleave(
        [
            [(index, example) for example in examples]
            for index, (examples, _) in enumerate(tokenized)
        ]
    )
    stats = TokenizeStats(
        **{
            field.name: sum(getattr(part_stats, field.name) for _, part_stats in tokenized)
            for field in dataclasses.fields(TokenizeStats)
        }
    )
    return [example for _, example in tagged], tuple(index for index, _ in tagged), stats


__all__ = [
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "DataBundle",
    "DataConfig",
    "DataFormatError",
    "DataSource",
    "MixShare",
    "build_data",
    "evaluate_exact_match",
    "exact_match",
    "generate_answers",
    "load_split_records",
    "mean_response_loss",
]
