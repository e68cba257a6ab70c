"""Data configuration."""

from __future__ import annotations

from dataclasses import dataclass

from falqon_dist.data.synthetic import FINETUNE_TASKS

DATASET_NAMES = ("synthetic", "alpaca", "oasst1", "jsonl")
#: Hub dataset used for ``alpaca`` / ``oasst1`` when ``path`` is None (needs network).
DEFAULT_HUB_NAMES = {"alpaca": "tatsu-lab/alpaca", "oasst1": "OpenAssistant/oasst1"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to fine-tune on and how to turn it into batches.

    Every field is validated on construction; a bad value raises ``ValueError`` naming the field and
    what would be valid.
    """

    #: Dataset: "synthetic" (built-in held-out task, no files needed) | "alpaca" | "oasst1" |
    #: "jsonl" (rows {"prompt", "response"} or Alpaca fields).
    name: str = "synthetic"
    #: Local file (.jsonl / .json / .parquet) or directory of them, for alpaca / oasst1 / jsonl. For
    #: alpaca / oasst1 a hub dataset name is also accepted (network only); None = the default hub
    #: dataset. Must be None for synthetic.
    path: str | None = None
    #: Synthetic only: the held-out fine-tuning task, one of synthetic.FINETUNE_TASKS.
    task: str = "shift"
    #: Tokens per example (prompt + response + EOS) and per packed row.
    max_length: int = 128
    #: True: pack several examples into rows of max_length (labels masked per example). False:
    #: one example per row, batches grouped by length.
    packing: bool = False
    #: Synthetic only: number of train / eval records (the splits never share a prompt).
    num_train: int = 2000
    num_eval: int = 200
    #: Share of records held out for eval when a file dataset has no split of its own, in (0, 1).
    eval_fraction: float = 0.05
    #: File / hub datasets: keep at most this many records per split (None keeps all).
    max_records: int | None = None
    #: oasst1 only: keep pairs whose prompt has this language code (e.g. "en"); None keeps all.
    lang: str | None = None
    #: Seed of synthetic generation, of the eval split and of the batch order.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"DataConfig.name must be one of {DATASET_NAMES}, got {self.name!r}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"DataConfig.path must be None or a non-empty string, got {self.path!r}")
        if self.name == "synthetic" and self.path is not None:
            raise ValueError(f"DataConfig.path must be None for name='synthetic', got {self.path!r}")
        if self.name == "jsonl" and self.path is None:
            raise ValueError("DataConfig.path is required for name='jsonl' (a local .jsonl/.json file or directory)")
        if self.task not in FINETUNE_TASKS:
            raise ValueError(f"DataConfig.task must be one of {FINETUNE_TASKS}, got {self.task!r}")
        if not _is_int(self.max_length) or self.max_length < 8:
            raise ValueError(f"DataConfig.max_length must be an integer >= 8, got {self.max_length!r}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"DataConfig.packing must be true or false, got {self.packing!r}")
        for field in ("num_train", "num_eval"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"DataConfig.{field} must be a positive integer, got {value!r}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) or not (
            0.0 < self.eval_fraction < 1.0
        ):
            raise ValueError(f"DataConfig.eval_fraction must be a number in (0, 1), got {self.eval_fraction!r}")
        if self.max_records is not None and (not _is_int(self.max_records) or self.max_records <= 0):
            raise ValueError(f"DataConfig.max_records must be None or a positive integer, got {self.max_records!r}")
        if self.lang is not None and (not isinstance(self.lang, str) or not self.lang):
            raise ValueError(f"DataConfig.lang must be None or a language code such as 'en', got {self.lang!r}")
        if not _is_int(self.seed):
            raise ValueError(f"DataConfig.seed must be an integer, got {self.seed!r}")
