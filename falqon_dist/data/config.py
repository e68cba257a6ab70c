"""Data configuration."""

from __future__ import annotations

from dataclasses import dataclass

from falqon_dist.config_checks import (
    InvalidField,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive_int,
    is_int,
)
from falqon_dist.data.synthetic import FINETUNE_TASKS

DATASET_NAMES = ("synthetic", "alpaca", "oasst1", "jsonl", "chat", "text")
#: Datasets read only from local files (no default hub dataset).
LOCAL_ONLY = ("jsonl", "chat", "text")
#: Hub dataset used for ``alpaca`` / ``oasst1`` when ``path`` is None (needs network).
DEFAULT_HUB_NAMES = {"alpaca": "tatsu-lab/alpaca", "oasst1": "OpenAssistant/oasst1"}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to fine-tune on and how to turn it into batches.

    Every field is validated on construction; a bad value raises
    :class:`~falqon_dist.config_checks.InvalidField` (a ``ValueError``) naming the field and what
    would be valid.
    """

    #: Dataset: "synthetic" (built-in held-out task, no files needed) | "alpaca" | "oasst1" |
    #: "jsonl" (rows {"prompt", "response"} or Alpaca fields) | "chat" (rows {"messages"} or
    #: ShareGPT {"conversations"}, rendered with the tokenizer's chat template) | "text" (rows
    #: {"text"} or .txt files, every token trained).
    name: str = "synthetic"
    #: Local file (.jsonl / .json / .parquet, .txt for text), directory of them, or a `datasets`
    #: save_to_disk directory; or a list of those (read one by one, concatenated). For alpaca /
    #: oasst1 a hub dataset name is also accepted (network only); None = the default hub dataset.
    #: Must be None for synthetic.
    path: str | tuple[str, ...] | None = None
    #: Synthetic only: the held-out fine-tuning task, one of synthetic.FINETUNE_TASKS.
    task: str = "shift"
    #: Tokens per example (prompt + response + EOS) and per packed row (the run's model.max_length;
    #: None only until the trainer has read the model's own context).
    max_length: int | None = 128
    #: True: pack several examples into rows of max_length (labels masked per example). False:
    #: one example per row, batches grouped by length.
    packing: bool = False
    #: Instruction formats (alpaca, jsonl, oasst1, chat): also train on the prompt / non-assistant
    #: tokens (False: the loss covers only responses and assistant turns).
    train_on_inputs: bool = False
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
        owner = "DataConfig"
        check_choice(owner, "name", self.name, DATASET_NAMES)
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))
        paths = self.path if isinstance(self.path, tuple) else (self.path,)
        if self.path is not None and (not paths or not all(isinstance(p, str) and p for p in paths)):
            raise InvalidField(owner, "path", "must be None, a non-empty string or a non-empty list of them", self.path)
        if self.name == "synthetic" and self.path is not None:
            raise InvalidField(owner, "path", "must be None for name='synthetic'", self.path)
        if self.name in LOCAL_ONLY and self.path is None:
            raise InvalidField(owner, "path", f"is required for name={self.name!r} (a local file or directory)",
                               self.path)
        check_choice(owner, "task", self.task, FINETUNE_TASKS)
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 8):
            raise InvalidField(owner, "max_length", "must be an integer >= 8", self.max_length)
        check_bool(owner, "packing", self.packing)
        check_bool(owner, "train_on_inputs", self.train_on_inputs)
        check_positive_int(owner, "num_train", self.num_train)
        check_positive_int(owner, "num_eval", self.num_eval)
        check_number(owner, "eval_fraction", self.eval_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.max_records is not None:
            check_positive_int(owner, "max_records", self.max_records)
        if self.lang is not None and (not isinstance(self.lang, str) or not self.lang):
            raise InvalidField(owner, "lang", "must be None or a language code such as 'en'", self.lang)
        check_int(owner, "seed", self.seed)
