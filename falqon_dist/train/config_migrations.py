"""Keys that moved or were added since runs were saved: old configs and command lines still read.

A run's ``config.yaml`` outlives the code that wrote it (export, eval and resume read it later), and
users' scripts keep their overrides: a key that moved is read under its new name
(:data:`MOVED_KEYS`, on the command line with a notice: :func:`falqon_dist.train.bootstrap.move_overrides`),
and a key added later takes the value the old run actually trained with (:data:`SAVED_CONFIG_DEFAULTS`).
"""

from __future__ import annotations

from typing import Any

#: What a run saved before a FALQON key existed ran with (its config.yaml lacks the key).
SAVED_CONFIG_DEFAULTS = {"falqon": {"topk": None, "unmerged": "discard", "carry_residual": False}}
#: Keys that moved: a saved config (or a command line) that still has the old one is read as the new.
MOVED_KEYS = {"fp8.cache_weight_transpose": "method.cache_weight_transpose"}


def move_keys(tree: dict[str, Any]) -> list[str]:
    """Rewrite, in place, the keys of :data:`MOVED_KEYS` in a config tree saved before they moved;
    return what was moved (``old -> new``). A moved key the run's method does not have is dropped."""
    moved = []
    for old, new in MOVED_KEYS.items():
        (old_group, old_key), (new_group, new_key) = old.split("."), new.split(".")
        section = tree.get(old_group)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = tree.setdefault(new_group, {})
        if new == "method.cache_weight_transpose" and target.get("name") != "falqon":
            continue
        target.setdefault(new_key, value)
        moved.append(f"{old} -> {new}")
    return moved
