#!/usr/bin/env python
"""Export a FALQON training run as an FP8 compressed-tensors model (transformers, vLLM).

    python launch/export.py run.dir=RUN_DIR [tag=latest|step_00000300|300] [out=DIR] [overwrite=true]
                            [max_shard_size=2GB]

Every key is documented in ``conf/export.yaml``; overrides follow Hydra's grammar, as for
launch/train.py. Runs as ONE plain ``python`` process whatever the run's world size and ZeRO stage: the model is
rebuilt from ``RUN_DIR/config.yaml`` (base model, FALQON rank/filter, backend, dtype) and the chosen
checkpoint is consolidated from its per-rank files (falqon_dist/distributed/checkpoint.py, the
model rebuilt by falqon_dist/train/restore.py). The FP8 codes and
scales are written unchanged (no requantization). ``out`` defaults to ``RUN_DIR/export``; an existing
non-empty ``out`` is refused unless ``overwrite=true``. Besides the model files the export holds
``falqon_run.json`` (the run, checkpoint and resolved training config), which launch/eval.py reads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from falqon_dist.train.cli import boolean, compose_cli, optional_str  # noqa: E402
from falqon_dist.train.saved_config import RestoreError  # noqa: E402


def parse_args(argv: list[str]) -> dict:
    """``argv`` as overrides of conf/export.yaml (every key documented there)."""
    cfg = compose_cli("export", argv, "launch/export.py")
    return {
        "run.dir": str(cfg.run.dir),
        "tag": str(cfg.tag),
        "out": optional_str(cfg.out, "out"),
        "overwrite": boolean(cfg.overwrite, "overwrite"),
        "max_shard_size": str(cfg.max_shard_size),
    }


def fp8_tensor_count(directory: Path) -> int:
    """Tensors stored as float8 in the export's safetensors files."""
    from safetensors import safe_open

    count = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            count += sum(handle.get_slice(name).get_dtype().startswith("F8") for name in names)
    return count


def export_run(
    run_dir: str, tag: str, out: str | None, overwrite: bool, max_shard_size: str
) -> dict:
    """Restore ``run_dir`` at ``tag``, export it; returns the summary that :func:`main` prints."""
    import logging

    from falqon_dist.export import export_fp8
    from falqon_dist.export.staging import check_destination
    from falqon_dist.export.writer import parse_size
    from falqon_dist.train.restore import restore_run

    start = time.perf_counter()
    run_path = Path(run_dir).expanduser().resolve()
    out_dir = Path(out).expanduser().resolve() if out else run_path / "export"
    parse_size(max_shard_size)
    check_destination(out_dir, overwrite)  # fail before the (long) restore
    logging.getLogger("falqon_dist").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    restored = restore_run(run_path, tag)
    origin = {
        "run_dir": restored.run_dir,
        "tag": restored.tag,
        "step": restored.step,
        "base_model": restored.model_path,
        "config": restored.config,
    }
    export_fp8(
        restored.model,
        out_dir,
        tokenizer=restored.tokenizer,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        run_info=origin,
    )
    files = [p for p in out_dir.iterdir() if p.is_file()]
    return {
        "out": str(out_dir),
        "run_dir": str(restored.run_dir),
        "tag": restored.tag,
        "step": restored.step,
        "size_mb": sum(p.stat().st_size for p in files) / 1e6,
        "fp8_tensors": fp8_tensor_count(out_dir),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        summary = export_run(
            args["run.dir"], args["tag"], args["out"], args["overwrite"], args["max_shard_size"]
        )
    except (RestoreError, FileExistsError, ValueError) as error:
        print(f"launch/export.py: error: {error}", file=sys.stderr)
        return 2
    print(
        "\n".join(
            [
                "=" * 64,
                " falqon_dist FP8 export",
                "-" * 64,
                f" run directory   {summary['run_dir']}",
                f" checkpoint      {summary['tag']} (step {summary['step']})",
                f" export          {summary['out']}",
                f" size            {summary['size_mb']:.2f} MB",
                f" FP8 tensors     {summary['fp8_tensors']}",
                f" time            {summary['seconds']:.1f} s",
                "=" * 64,
            ]
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
