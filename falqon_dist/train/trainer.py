"""The training recipe: setup → evaluate → train (micro-batches, step, merge, log, save) → evaluate.

``run(cfg)`` is what ``launch/train.py`` calls on every rank. The loop never touches FP8 details:
after each optimizer step it calls the method's post-optimizer hook
(:func:`falqon_dist.methods.post_optimizer_hook`: FALQON's merge of B into the FP8 backbone, none for
the baselines), whose statistics come back as metrics, and before the final export the hook's fold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf

from falqon_dist.data import DataBundle, build_data
from falqon_dist.distributed import checkpoint, initialize
from falqon_dist.distributed.waits import announced, barrier, errors_of_every_rank
from falqon_dist.files import open_no_follow, write_atomic
from falqon_dist.method.merge_math import COUNT_NAMES
from falqon_dist.methods import PostOptimizerHook, post_optimizer_hook
from falqon_dist.train.batches import BatchStream
from falqon_dist.train.divergence import DivergedError, StepWatch
from falqon_dist.train.evaluate import eval_losses, greedy_exact_match
from falqon_dist.train.logging_utils import (
    MetricsWriter,
    ProgressClock,
    progress_bar,
    setup_logging,
)
from falqon_dist.train.loss import StepSums, accumulate_step
from falqon_dist.train.model_setup import (
    build_model,
    load_tokenizer,
    parameter_facts,
    resolve_model_path,
)
from falqon_dist.train.preemption import Preempted, Preemption
from falqon_dist.train.preflight import preflight, resolve_model_context
from falqon_dist.train.run_dir import RunDirBusy, RunDirLock, check_resume
from falqon_dist.train.settings import ConfigError, RunSettings, validate
from falqon_dist.train.tensorboard_logger import TensorBoardLogger
from falqon_dist.train.wandb_logger import WandbLogger

#: Prefix of the final metrics of the training forward, before B was folded into the FP8 bytes.
BEFORE_FOLD = "before_fold/"

log = logging.getLogger("falqon_dist")


def lr_lambda(settings: RunSettings):
    """Linear warm-up, then constant, cosine or linear decay to ``min_lr_ratio`` of the peak."""
    t = settings.train
    warmup = t.warmup_steps or 0  # resolved from warmup_ratio by now

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1.0 - progress
        )
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


def step_totals(sums: StepSums, device: torch.device, *, stop: bool = False) -> torch.Tensor:
    """``[Σ token losses, target tokens, input tokens, ranks asking to stop]`` of one optimizer step
    (:func:`~falqon_dist.train.loss.accumulate_step`'s sums), summed over ranks (so a stop requested
    on any rank is seen by all, after the same step). The step's loss is the first over the second.

    Built and all-reduced on ``device`` — the rank's accelerator: NCCL refuses CPU tensors — and
    left there, so the step issues no host synchronization until its record is read.
    """
    totals = torch.stack(
        [
            sums.loss.detach().double(),
            sums.targets.double(),
            sums.input_tokens.double(),
            torch.full((), float(stop), dtype=torch.float64, device=device),  # a fill: no copy
        ]
    ).to(device)
    if tdist.is_initialized():
        tdist.all_reduce(totals)
    return totals


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: CUDA allocator peak on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """One training run on every rank; rank 0 writes every output."""

    def __init__(self, cfg: DictConfig) -> None:
        self.settings = validate(cfg)  # fail before any work starts
        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        # files, libraries, the user's DeepSpeed JSON
        self.ds_config = preflight(self.settings, self.world)
        # model.max_length=null: the model's context
        self.settings = resolve_model_context(self.settings, cfg)
        self.is_main = self.rank == 0
        self.run_dir = self.settings.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_lock, resume_warnings = self._claim_run_dir(cfg)  # before anything is written
        if self.is_main:
            write_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        barrier("see the run directory created by rank 0")
        setup_logging(self.run_dir, self.rank)
        for warning in resume_warnings:
            log.warning("train.resume=true with a changed config: %s", warning)
        self.resolved_config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        self.merge_hook: PostOptimizerHook | None = None  # built with the engine (setup)
        self.wandb: WandbLogger | None = None
        self.tensorboard: TensorBoardLogger | None = None
        self.watch = StepWatch(self.settings.train)
        self.preemption = Preemption()
        self.stop_requested = False

    def _claim_run_dir(self, cfg: DictConfig) -> tuple[RunDirLock | None, list[str]]:
        """Rank 0 locks the run directory and checks a resume against the saved config; every rank
        gets the verdict (one broadcast), so all fail together with the same message."""
        lock = None
        verdict: list[Any] = [None, None, []]  # [error kind, message, resume warnings]
        if self.is_main:
            try:
                lock = RunDirLock(self.run_dir)
                if self.settings.train.resume:
                    tag = checkpoint.latest_tag(self.ckpt_dir)
                    saved = None if tag is None else checkpoint.saved_world_size(self.ckpt_dir, tag)
                    verdict[2] = check_resume(self.run_dir, cfg, self.world, saved)
            except (RunDirBusy, ConfigError, checkpoint.CheckpointReadError) as exc:
                verdict[:2] = [type(exc).__name__, str(exc)]
                if lock is not None:
                    lock.release()
        if self.world > 1:
            with announced("rank 0 to lock the run directory and check the resume"):
                tdist.broadcast_object_list(verdict, src=0)
        kind, message, warnings = verdict
        if kind is not None:
            raise (RunDirBusy if kind == "RunDirBusy" else ConfigError)(message)
        return lock, warnings

    # ------------------------------------------------------------------ setup

    def _load_data(self) -> DataBundle:
        """``build_data`` on every rank. A bad dataset (a malformed row, a missing file, nothing that
        fits max_length) fails the same way everywhere: rank 0 says it once and all ranks leave
        together; where only some ranks failed (a file missing on one node), the error names them."""
        data, error = None, None
        try:
            data = build_data(self.settings.data, self.tokenizer)
        except (
            ValueError,
            OSError,
        ) as exc:  # DataFormatError is a ValueError, FileNotFoundError an OSError
            error = str(exc)
        failed = errors_of_every_rank(error, "load and tokenize the data")
        if failed:
            raise ConfigError(ranks_failure(failed, self.world, "the data"))
        assert data is not None  # no rank failed
        return data

    def setup(self) -> None:
        s = self.settings
        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)
        log.info(
            "run dir %s | %d rank(s) | method=%s | ZeRO-%d | %s",
            self.run_dir,
            self.world,
            s.method.name,
            s.deepspeed.zero_stage,
            s.model.dtype,
        )
        model_path = self.model_path = resolve_model_path(s)
        self.tokenizer = load_tokenizer(model_path, s.model.trust_remote_code)
        self.data = self._load_data()
        log.info(
            "data=%s: %d train rows, %d eval rows (%d train examples dropped: too long)",
            s.data.name,
            len(self.data.train),
            len(self.data.eval),
            self.data.train_stats.dropped,
        )
        for share in self.data.mixture:
            log.info("data=mix: %s", share.describe())
        sampler = self.data.train_batch_sampler(
            s.train.micro_batch_size, num_replicas=self.world, rank=self.rank
        )
        # the schedule needs max_steps: count the data's batches first
        if s.train.epochs is not None:
            s = self.settings = dataclasses.replace(
                s, train=s.train.for_steps_per_epoch(len(sampler))
            )
            self.watch = StepWatch(s.train)
            log.info(
                "train.epochs=%g: %d optimizer steps (%d micro-batches of %d per rank and epoch; "
                "train.max_steps is not used)",
                s.train.epochs,
                s.train.max_steps,
                len(sampler),
                s.train.micro_batch_size,
            )
        model = build_model(model_path, s, self.ds_config)
        self.model_facts = parameter_facts(model)
        with announced("every rank's DeepSpeed engine set-up (its first collectives)"):
            self.engine = initialize(
                model,
                self.ds_config,
                lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_lambda(s)
                ),
            )
        # FALQON: merge B into the FP8 backbone after every optimizer step (None for the baselines)
        self.merge_hook = post_optimizer_hook(
            s.method.config, self.engine.module, self.engine.optimizer
        )
        self.batches = BatchStream(self.data.train, sampler, self.data.collate_fn)
        self.start_step, self.resumed_from = 0, cast(str | None, None)
        if s.train.resume:
            self._resume()
        self.metrics = MetricsWriter(
            self.run_dir / "metrics.jsonl",
            self.is_main,
            resume_step=self.start_step if s.train.resume else None,
        )
        self.wandb = WandbLogger(
            s.wandb, self.run_dir, self.resolved_config, enabled=self.is_main and s.uses_wandb
        )
        self.tensorboard = TensorBoardLogger(
            self.run_dir, self.resolved_config, enabled=self.is_main and s.uses_tensorboard
        )

    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is None:
            log.info(
                "train.resume=true but %s holds no checkpoint: starting from step 0", self.ckpt_dir
            )
            return
        with announced(f"every rank to load checkpoint {tag}"):
            tag, client_state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self.batches.restore(client_state["data"])
        self.start_step, self.resumed_from = int(client_state["step"]), tag
        log.info("resumed from %s at step %d", self.ckpt_dir / tag, self.start_step)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, *, generate: bool = True) -> dict[str, float]:
        """Eval losses and, with ``generate`` (data=synthetic), the greedy exact match."""
        s, module = self.settings, self.engine.module
        out: dict[str, float] = {}
        if s.train.eval_samples:
            out["eval_loss"], by_source = eval_losses(
                module, self.data, s.train.eval_samples, s.train.micro_batch_size
            )
            out.update(
                {f"eval_loss/{name}": loss for name, loss in by_source.items() if loss is not None}
            )
        if generate and s.train.eval_generate_samples and s.data.name == "synthetic":
            out["eval_exact_match"] = greedy_exact_match(
                module,
                self.tokenizer,
                self.data.eval_records,
                s.train.eval_generate_samples,
                batch_size=64,
            )
        return out

    def fold_and_evaluate(self, trained: dict[str, float]) -> dict[str, float]:
        """The final evaluation of the model an FP8 export holds, where the forward adds B's term
        (the carry, unmerged rows, updates between merges; ``merge_hook.needs_fold``).

        B is folded into the FP8 bytes (``merge_hook.fold()``: every row, nearest, B and its master
        zeroed) after the last checkpoint was saved, and the model evaluated again: the reported
        metrics are the folded model's, the bytes ``export.enabled`` and ``launch/export.py`` (which
        folds the checkpoint's B the same way) write; ``before_fold/*`` keeps ``trained``, the
        training forward's, and the log says what the fold cost.
        """
        if self.merge_hook is not None:
            self.merge_hook.fold()
        shipped = self.evaluate()
        if "eval_loss" in trained:
            change = shipped["eval_loss"] / trained["eval_loss"] - 1
            log.info(
                "folded B into the FP8 backbone for the export: eval loss %.4f as trained -> %.4f as exported "
                "(%+.2f%%, what FP8 cannot hold of the carry)",
                trained["eval_loss"],
                shipped["eval_loss"],
                100 * change,
            )
        return {**shipped, **{f"{BEFORE_FOLD}{key}": value for key, value in trained.items()}}

    # ------------------------------------------------------------------ training

    def train_step(self) -> dict[str, float]:
        """One optimizer step: grad_accum micro-batches (:func:`~falqon_dist.train.loss.accumulate_step`:
        the loss weighted by token over the whole step), the engine's step, then the method's
        post-optimizer hook (FALQON's merge) once the engine's step counter advanced.

        The record's ``loss`` is the step's token-weighted mean: the cross-entropy summed over every
        target token of every micro-batch on every rank, over their count (what was back-propagated).
        Losses, token counts and merge statistics stay on the device until the record is built:
        one read-back per step (plus DeepSpeed's own), none per micro-batch or per layer.
        """
        engine, start = self.engine, time.perf_counter()
        sums = accumulate_step(
            engine, [self.batches.next() for _ in range(self.settings.train.grad_accum)]
        )
        merge, steps = None, engine.global_steps
        engine.step()  # the accumulation boundary: the optimizer step
        if self.merge_hook is not None and engine.global_steps > steps:
            merge = self.merge_hook(engine.global_steps)
        totals = step_totals(sums, engine.device, stop=self.preemption.requested)
        if merge is not None and not merge.layers:  # no layer was due (method.merge_every)
            merge = None
        if merge is not None:
            totals = torch.cat([totals, merge.counts().to(totals)])
        values = totals.tolist()  # the step's one host synchronization
        self.stop_requested = values[3] > 0
        elapsed = time.perf_counter() - start
        record = {
            "loss": values[0] / max(values[1], 1.0),
            "lr": engine.get_lr()[0],
            "step_time_s": elapsed,
            "tokens_per_s": values[2] / elapsed,
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if merge is not None:
            record.update(zip(COUNT_NAMES, (int(v) for v in values[4:])))
        record["mem_peak_mb"] = peak_memory_mb(engine.device)
        return record

    def last_checkpoint(self) -> str | None:
        tag = checkpoint.latest_tag(self.ckpt_dir)
        return None if tag is None else str(self.ckpt_dir / tag)

    def save(self, step: int) -> None:
        # resumed at max_steps: no step taken
        if step == self.start_step and self.resumed_from is not None:
            log.info(
                "checkpoint %s is the one this run resumed from and no step was taken since: kept as it is",
                self.ckpt_dir / self.resumed_from,
            )
            return
        if self.watch.last_step_bad:  # never replace the last good checkpoint with a diverged state
            log.warning(
                "step %d had non-finite values: not saving a checkpoint from it (the last good one stays: %s)",
                step,
                self.last_checkpoint(),
            )
            return
        state = {"data": self.batches.state(), "step": step}
        # the first checkpoint's size, for the free-space check: the weights as stored, plus an fp32
        # master and two Adam moments per trainable element
        expected = self.model_facts["param_bytes"] + 12 * self.model_facts["trainable_params"]
        tag = checkpoint.save(self.engine, self.ckpt_dir, step, client_state=state,
                              keep=self.settings.train.keep_checkpoints, expected_bytes=expected)  # fmt: skip
        log.info("saved checkpoint %s", self.ckpt_dir / tag)

    def train(self) -> dict[str, Any]:
        s = self.settings.train
        before = self.evaluate() if self.start_step == 0 else {}
        if self.start_step == 0:
            self.log_record({"step": 0, **self.model_facts, **before})
        bar = progress_bar(s.max_steps, self.start_step, self.is_main)
        self.clock = ProgressClock(s.max_steps, self.start_step)
        speeds = []
        step = self.start_step
        for step in range(self.start_step + 1, s.max_steps + 1):
            record = self.train_step()
            speeds.append(record["tokens_per_s"])
            if step % s.log_every == 0 or step == s.max_steps or self.stop_requested:
                self.log_record({"step": step, **record}, progress=self.clock.describe(step))
            self.watch.check(step, record, last_checkpoint=self.last_checkpoint)
            if self.stop_requested:
                bar.close()
                self.save(step)
                raise Preempted(step, self.preemption.signum or signal.SIGTERM)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if s.eval_every and step % s.eval_every == 0 and step != s.max_steps:
                self.log_record({"step": step, **self.evaluate()})
            if s.save_every and step % s.save_every == 0 and step != s.max_steps:
                self.save(step)
        bar.close()
        folds = self.merge_hook is not None and self.merge_hook.needs_fold
        # with a fold, the losses suffice to say what it cost
        trained = self.evaluate(generate=not folds)
        # the exact training state: a resume continues as an uninterrupted run would
        self.save(s.max_steps)
        after = self.fold_and_evaluate(trained) if folds else trained
        self.log_record({"step": s.max_steps, **after})
        return {
            "before": before,
            "after": after,
            "tokens_per_s": float(np.median(speeds)) if speeds else None,
        }

    def log_record(self, record: dict[str, Any], progress: str | None = None) -> None:
        if not self.is_main:
            return
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.tensorboard is not None:
            self.tensorboard.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )
        line = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        log.info("%s%s", f"[{progress}] " if progress else "", line)

    def export(self) -> Path | None:
        if not self.settings.export:
            return None
        from falqon_dist.export import export_fp8

        out, step = self.run_dir / "export", self.settings.train.max_steps
        # where it came from (falqon_run.json), for launch/eval.py wherever the export is copied
        origin = {"run_dir": self.run_dir, "tag": checkpoint.tag_for(step), "step": step,
                  "base_model": self.model_path, "config": self.resolved_config}  # fmt: skip
        export_fp8(
            self.engine.module, out, tokenizer=self.tokenizer, overwrite=True, run_info=origin
        )
        log.info("exported FP8 model to %s", out)
        return out

    def summarize(self, result: dict[str, Any], export_dir: Path | None) -> None:
        if not self.is_main:
            return
        before, after = result["before"], result["after"]

        def fmt(key: str, values: dict[str, float]) -> str:
            return f"{values[key]:.4f}" if key in values else "—"

        lines = [
            "",
            "=" * 64,
            f" falqon_dist run summary ({self.settings.method.name}, {self.world} rank(s), "
            f"ZeRO-{self.settings.deepspeed.zero_stage})",
            "-" * 64,
            f" eval loss          {fmt('eval_loss', before):>10} -> {fmt('eval_loss', after):>10}",
            *(
                f"   {key[len('eval_loss/') :]:<16} {fmt(key, before):>10} -> {fmt(key, after):>10}"
                for key in after
                if key.startswith("eval_loss/")
            ),
            f" eval exact match   {fmt('eval_exact_match', before):>10} -> {fmt('eval_exact_match', after):>10}",
            *(
                [
                    f" as trained (B live){'':>10} -> {fmt(BEFORE_FOLD + 'eval_loss', after):>10}"
                    "  (the above: as exported, B folded into FP8)"
                ]
                if BEFORE_FOLD + "eval_loss" in after
                else []
            ),
            f" tokens/s (median)  {result['tokens_per_s'] or 0:>10.1f}",
            f" run directory      {self.run_dir}",
        ]
        if export_dir is not None:
            lines.append(f" FP8 export         {export_dir}")
        lines.append("=" * 64)
        print("\n".join(lines), flush=True)
        # the summary stays with the run, not only on stdout
        with open_no_follow(self.run_dir / "train.log", "a") as handle:
            handle.write("\n".join(lines[1:]) + "\n")
        if self.wandb is not None:
            self.wandb.summary({f"final_{k}": v for k, v in after.items()})

    def cleanup(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.finish()
        if self.run_lock is not None:
            self.run_lock.release()


def ranks_failure(failed: dict[int, str], world: int, what: str) -> str:
    """One message for the errors ``{rank: error}`` of a step every rank ran: the error itself when
    every rank met the same one, else each failing rank's (``rank 1: ...``)."""
    if len(failed) == world and len(set(failed.values())) == 1:
        return next(iter(failed.values()))
    return f"{what} failed on {len(failed)} of {world} ranks: " + "; ".join(
        f"rank {rank}: {message}" for rank, message in sorted(failed.items())
    )


def report(message: str, kind: str = "error", *, this_rank: bool = False) -> None:
    """One ``falqon_dist: <kind>: ...`` line from rank 0 (stderr, and train.log once logging is up);
    ``this_rank=True`` for a failure only this rank saw (it names the rank itself)."""
    if not this_rank and (tdist.get_rank() if tdist.is_initialized() else 0) != 0:
        return
    if log.handlers:
        log.error("falqon_dist: %s: %s", kind, message)
    else:
        print(f"falqon_dist: {kind}: {message}", file=sys.stderr, flush=True)


#: Set to print an unexpected failure's traceback on stderr too (it always goes to a file).
DEBUG_ENV = "FALQON_DIST_DEBUG"


def report_crash(exc: BaseException, run_dir: Path | None) -> None:
    """One line for an unexpected failure on this rank (what, where); the traceback goes to
    ``run_dir/error_rank<R>.txt`` (and to stderr with ``FALQON_DIST_DEBUG=1``)."""
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    trace = "".join(traceback.format_exception(exc))
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename}:{frame.lineno} in {frame.name}" if frame else ""
    saved = ""
    if run_dir is not None and run_dir.is_dir():
        path = run_dir / f"error_rank{rank}.txt"
        with contextlib.suppress(OSError):
            write_atomic(path, trace)
            saved = f"; traceback in {path}"
    if os.environ.get(DEBUG_ENV):
        print(trace, file=sys.stderr, flush=True)
    else:
        saved += f" (or set {DEBUG_ENV}=1 to print it)"
    report(f"rank {rank} failed: {type(exc).__name__}: {exc}{where}{saved}", this_rank=True)


def run(cfg: DictConfig) -> None:
    """Train as ``cfg`` says. Exits non-zero with one line (rank 0) on a bad config, a diverged run
    (1), or a preemption signal (128 + signal, after saving a checkpoint); with one line per failing
    rank on a failure of that rank alone (1), which then leaves without waiting for its peers (they
    may be inside a collective it will never join): the launcher ends them."""
    trainer, code, alone = None, 0, False
    try:
        trainer = Trainer(cfg)
        trainer.preemption.install()
        trainer.setup()
        result = trainer.train()
        export_dir = trainer.export()
        trainer.summarize(result, export_dir)
    except (ConfigError, DivergedError, RunDirBusy, checkpoint.CheckpointSpaceError) as exc:
        report(str(exc))  # every rank raised the same error: rank 0 says it
        code = 1
    except checkpoint.CheckpointWriteError as exc:
        report(str(exc), this_rank=True)
        code, alone = 1, True  # only this rank failed: its peers may wait inside DeepSpeed's save
    except Preempted as exc:
        last = trainer.last_checkpoint() if trainer is not None else None
        report(f"{exc} (checkpoint: {last})", kind="stopped")
        code = 128 + exc.signum
    # a bug or an environment failure on this rank: said once, traced to a file
    except Exception as exc:
        report_crash(exc, trainer.run_dir if trainer is not None else _existing_dir(cfg))
        code, alone = 1, True
    finally:
        if trainer is not None:
            trainer.cleanup()
        if tdist.is_initialized() and not alone:
            barrier("finish the run (rank 0 writes the summary and export)")
        # a rank that failed alone leaves at once: the launcher ends its peers
        if tdist.is_initialized():
            tdist.destroy_process_group()
    if code:
        raise SystemExit(code)


def _existing_dir(cfg: DictConfig) -> Path | None:
    """``run.dir`` when the run failed before the trainer existed (only if it is already there)."""
    with contextlib.suppress(Exception):
        path = Path(str(cfg.run.dir))
        return path if path.is_dir() else None
    return None
