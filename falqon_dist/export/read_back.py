"""Reading back what a training run saved: plain values only, never resolved in the reader's process.

Training writes its config resolved (every ``${...}`` replaced by its value), so a saved config (a
run's ``config.yaml``, the ``config`` object of an export's ``falqon_run.json``) holds plain values
only. A string that still holds ``${`` was edited or made elsewhere: resolving it would run *the
reader's* resolvers on someone else's file (``wandb.name: ${oc.env:WANDB_API_KEY}`` in a shared run
directory would otherwise be resolved by an export and written into its ``falqon_run.json``), so it
is refused, naming the file and the dotted key. This rule lives here, below both of its users: the
export's ``falqon_run.json`` reader (:mod:`falqon_dist.export.run_info`) and the run directory's
``config.yaml`` reader (:mod:`falqon_dist.train.saved_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: What starts an OmegaConf interpolation (``${key}``, ``${oc.env:NAME}``, any resolver).
INTERPOLATION = "${"


class RestoreError(RuntimeError):
    """A run directory that cannot be used after training; the message names the missing path or bad key."""


def find_interpolation(tree: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first ``(dotted key, string)`` of ``tree`` (plain dicts, lists and scalars) whose string
    holds an interpolation, or None. List items are named ``key[i]``. An OmegaConf container is
    read with ``resolve=False`` (iterating it would resolve its values)."""
    if isinstance(tree, (DictConfig, ListConfig)):
        tree = OmegaConf.to_container(tree, resolve=False)
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            found = find_interpolation(value, f"{prefix}.{key}" if prefix else str(key))
            if found is not None:
                return found
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            found = find_interpolation(value, f"{prefix}[{index}]")
            if found is not None:
                return found
    elif isinstance(tree, str) and INTERPOLATION in tree:
        return prefix, tree
    return None


def check_no_interpolation(tree: Any, where: str) -> None:
    """:class:`RestoreError` naming ``where`` and the dotted key if any string of ``tree`` holds ``${``."""
    found = find_interpolation(tree)
    if found is None:
        return
    key, value = found
    shown = value if len(value) <= 120 else value[:117] + "..."
    raise RestoreError(
        f"{where}: key {key} holds an interpolation {shown!r}; a saved config is written resolved, so this "
        f"file was edited or made elsewhere: replace it with the plain value (a saved config is never "
        f"resolved when it is read back: that would run this machine's resolvers, e.g. read its environment)"
    )
