"""The one-process command lines (``launch/export.py``, ``launch/eval.py``) as Hydra compositions.

Each has its own config beside the training one (``conf/export.yaml``, ``conf/eval.yaml``, every
field documented there), and takes ``key=value`` overrides exactly as ``launch/train.py`` does
(Hydra's override grammar: ``null``, quoting, lists). :func:`compose_cli` turns what Hydra would
print as a multi-line composition error into one ``ValueError`` naming the key and the valid ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from falqon_dist.train.bootstrap import strip_local_rank
from falqon_dist.train.run_dir import flatten

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_cli(config_name: str, argv: list[str], script: str) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``argv``'s overrides; ``ValueError`` (one line) for an unknown
    key, an unparsable override, a required key left out, or a launch on several ranks."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"{script} runs as one plain `python` process, whatever the run's world size"
        )
    overrides = strip_local_rank(argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        valid = list(flatten(OmegaConf.to_container(compose(config_name=config_name))))
        for override in overrides:
            key, sep, _ = override.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {override!r} (keys: {', '.join(valid)})")
            if key.lstrip("+~") not in valid:
                raise ValueError(
                    f"unknown key {key.lstrip('+~')!r}; valid keys: {', '.join(valid)}"
                )
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except HydraException as error:
            raise ValueError(
                f"cannot read the overrides {' '.join(overrides)}: {' '.join(str(error).split())}"
            ) from None
    for key in OmegaConf.missing_keys(cfg):
        raise ValueError(f"{key}=... is required")
    return cfg


def non_negative_int(value: object, key: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def optional_str(value: object, key: str) -> str | None:
    if value is None:
        return None
    if OmegaConf.is_config(value):
        raise ValueError(f"{key} must be a path or name, got {value!r}")
    return str(value)
