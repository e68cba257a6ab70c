"""A ``transformers.TrainerCallback`` that merges FALQON's proxies after every optimizer step.

FALQON trains only the proxies B and must merge them into the FP8 backbone right after each
optimizer step (:mod:`falqon_dist.method.proxy`); the Trainer knows nothing of that, so
:class:`FalqonCallback` runs FALQON's post-optimizer hook
(:class:`~falqon_dist.distributed.ProxyMergeHook`, the one the falqon_dist trainer runs) in
``on_step_end``, which the Trainer calls once per optimizer step (after gradient accumulation):

* **plain PyTorch** (no DeepSpeed; the Trainer's own AdamW, any precision): the optimizer updates
  ``B`` itself, so the merge reads and resets the parameter (the bytes and B of
  :func:`falqon_dist.merge_proxies_`);
* **DeepSpeed ZeRO 0–3** (``TrainingArguments(deepspeed=...)``): the optimizer keeps an fp32 master
  of B and copies it back into the parameter after each step, so the merge reads and resets that
  master (:class:`~falqon_dist.distributed.proxies.ProxyMasters`), consistent on every rank and
  sharded under ZeRO-3.

The optimizer step number keys stochastic merge rounding. The merge statistics (rows merged,
saturated and non-finite elements, summed since the previous log) are added as ``falqon/<name>`` to
the Trainer's ``log_history`` (``trainer_state.json``) and to the log dict the callbacks after this
one see, read only when the Trainer logs (no host synchronization per step). The Trainer calls its
reporting integrations (W&B, TensorBoard) before user callbacks, so they do not get these keys.
With ``export_dir``, the FP8 export (:func:`falqon_dist.export_fp8`, with the Trainer's tokenizer)
is written at the end of training, on every rank (ZeRO-3 gathers collectively; rank 0 writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as error:  # transformers is a core dependency; say so if it is missing anyway
    raise ImportError(
        "falqon_dist.integrations needs transformers (pip install transformers)"
    ) from error

from falqon_dist.distributed.merge_hook import ProxyMergeHook
from falqon_dist.method import falqon_layers
from falqon_dist.method.merge_math import MergeStats


def _deepspeed_optimizer(optimizer: Any) -> Any | None:
    """DeepSpeed's optimizer behind the Trainer's (accelerate wraps it), or None without DeepSpeed."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if type(inner).__module__.startswith("deepspeed") else None


class FalqonCallback(TrainerCallback):
    """Merge FALQON's B into the FP8 backbone after every optimizer step of a ``transformers.Trainer``.

    ``export_dir``: write the FP8 export there when training ends (None: no export).
    ``max_shard_size``: of the export's safetensors files.
    """

    def __init__(
        self, export_dir: str | Path | None = None, *, max_shard_size: int | str = "2GB"
    ) -> None:
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.max_shard_size = max_shard_size
        self._hook: ProxyMergeHook | None = None
        self._pending = MergeStats()
        #: Totals over the whole run so far (``rows_merged``, ``saturated``, ``nonfinite``, ...), read at each log.
        self.totals: dict[str, int] = {}

    def on_train_begin(
        self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs
    ):
        if model is None or not falqon_layers(model):
            raise ValueError(
                "FalqonCallback: the Trainer's model has no FalqonLinear layer; convert it with "
                "falqon_dist.convert_model(model, FalqonConfig(...)) before building the Trainer"
            )
        # without DeepSpeed the parameters are their own masters (the Trainer's optimizer steps them in place)
        self._hook = ProxyMergeHook(model, _deepspeed_optimizer(optimizer))

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self._hook is None:
            raise RuntimeError(
                "FalqonCallback.on_step_end before on_train_begin: add it to the Trainer's callbacks"
            )
        self._pending.add_(self._hook(state.global_step))

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        if logs is None or not self._pending.layers:
            return
        stats = {name: value for name, value in self._pending.to_dict().items() if name != "layers"}
        for name, value in stats.items():
            self.totals[name] = self.totals.get(name, 0) + value
        entry = {f"falqon/{name}": value for name, value in stats.items()}
        logs.update(entry)  # seen by the callbacks after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # the Trainer copied logs there just before: trainer_state.json
            state.log_history[-1].update(entry)
        self._pending = MergeStats()

    def on_train_end(
        self, args, state, control, model: nn.Module | None = None, processing_class=None, **kwargs
    ):
        if self.export_dir is not None and model is not None:
            from falqon_dist.export import export_fp8

            export_fp8(
                model,
                self.export_dir,
                tokenizer=processing_class or kwargs.get("tokenizer"),
                max_shard_size=self.max_shard_size,
                overwrite=True,
            )
