"""``falqon_run.json``: where an FP8 export came from, kept next to its model files.

Written by every export of a training run (the trainer's ``export.enabled=true`` and
``launch/export.py``): the run directory, the checkpoint tag and step, the base model and the
resolved training config. ``launch/eval.py`` reads the config back to evaluate the export on the
run's own data and settings, wherever the export has been copied to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from falqon_dist.export.read_back import check_no_interpolation
from falqon_dist.files import write_atomic

RUN_INFO = "falqon_run.json"


def write_run_info(
    out_dir: Path,
    *,
    run_dir: Path,
    tag: str,
    step: int | None,
    base_model: str,
    config: dict[str, Any],
) -> Path:
    """Write ``out_dir/falqon_run.json``; returns its path."""
    info = {
        "run_dir": str(run_dir),
        "tag": tag,
        "step": step,
        "base_model": base_model,
        "config": config,
    }
    path = Path(out_dir) / RUN_INFO
    write_atomic(path, json.dumps(info, indent=2, default=str) + "\n")
    return path


def read_run_info(export_dir: Path) -> dict[str, Any] | None:
    """The export's ``falqon_run.json`` (None if it has none); ``ValueError`` naming a corrupt one.

    Its ``config`` is a saved config: it is checked as every saved config is read back
    (:func:`~falqon_dist.export.read_back.check_no_interpolation`), so a string holding ``${`` is a
    ``RestoreError`` naming the file and the dotted key, never resolved in this process. Read the
    config itself with :func:`~falqon_dist.train.saved_config.read_saved_config`.
    """
    path = Path(export_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ValueError(
            f"{path}: expected an object with a 'config' object (written by falqon_dist's export)"
        )
    check_no_interpolation(info["config"], f"{path}: config")
    return info
