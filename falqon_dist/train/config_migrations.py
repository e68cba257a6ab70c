"""Keys that moved or were replaced since runs were saved: old configs and command lines still read.

A run's ``config.yaml`` outlives the code that wrote it (export, eval and resume read it later), and
users' scripts keep their overrides: a key that moved is read under its new name
(:data:`MOVED_KEYS`, on the command line with a notice: :func:`falqon_dist.train.bootstrap.move_overrides`).

FALQON's merge was three interacting keys, ``method.topk`` (``all`` or a top-k count),
``method.unmerged`` (``keep`` / ``discard``) and ``method.carry_residual``; it is one recipe now,
``method.merge`` (:mod:`falqon_dist.method.config`), with ``method.topk`` the top-k count only.
:func:`merge_recipe` reads the old keys as the recipe they meant:

=============================================  =====================
old keys                                       method.merge
=============================================  =====================
topk=all, carry_residual=true                  every_row (topk null)
top-k, unmerged=keep, carry_residual=true      topk_carry
top-k, unmerged=keep, carry_residual=false     topk_keep
top-k, unmerged=discard                        paper
topk=all, carry_residual=false                 refused: no longer offered
=============================================  =====================

A saved config that lacks an old key ran with what the code did before that key existed
(:data:`SAVED_CONFIG_DEFAULTS`: the paper's merge); a command line that gives only some of them
meant the others at their former shipped defaults (:data:`FORMER_DEFAULTS`).
"""

from __future__ import annotations

from typing import Any

from falqon_dist.train.config_errors import ConfigError

#: The ``method/`` keys of FALQON's merge before ``method.merge`` (``topk`` stayed, with a new meaning).
OLD_MERGE_KEYS = ("topk", "unmerged", "carry_residual")
#: Old merge keys that no longer exist (``method.merge`` replaced them).
REMOVED_MERGE_KEYS = ("unmerged", "carry_residual")
#: What a run saved before a FALQON merge key existed ran with (its config.yaml lacks the key): the
#: paper's merge, top-k = rank rows, B zeroed after every merge.
SAVED_CONFIG_DEFAULTS = {"falqon": {"topk": None, "unmerged": "discard", "carry_residual": False}}
#: The shipped defaults of the old merge keys: what a command line giving only some of them meant.
FORMER_DEFAULTS = {"topk": "all", "unmerged": "keep", "carry_residual": True}
#: Keys that moved: a saved config (or a command line) that still has the old one is read as the new.
MOVED_KEYS = {"fp8.cache_weight_transpose": "method.cache_weight_transpose"}


def merge_recipe(topk: Any, unmerged: Any, carry_residual: Any) -> tuple[str, Any]:
    """``(method.merge, method.topk)`` for the old keys' values (module docstring's table).

    ``topk`` is passed on as it is unless ``"all"`` (the new ``FalqonConfig`` checks a count);
    :class:`ConfigError` naming the key for a value the old keys never took, and for every row
    merged without the carry, which is no longer offered.
    """
    if unmerged not in ("keep", "discard"):
        raise ConfigError(
            f"method.unmerged must be keep or discard, got {unmerged!r} (it is now part of method.merge: "
            "every_row | topk_carry | topk_keep | paper)"
        )
    if not isinstance(carry_residual, bool):
        raise ConfigError(
            f"method.carry_residual must be true or false, got {carry_residual!r} (it is now part of "
            "method.merge: every_row | topk_carry | topk_keep | paper)"
        )
    if topk == "all":
        if not carry_residual:
            raise ConfigError(
                "method.carry_residual=false with method.topk=all (every row merged, what FP8 rounding drops lost) "
                "is no longer offered: write method.merge=every_row (every row, what rounding drops kept in B: the "
                "default) instead of method.topk=all and method.carry_residual, or a top-k merge without the carry, "
                "method.merge=topk_keep or method.merge=paper (these also take method.merge_rounding=stochastic)"
            )
        return "every_row", None
    if unmerged == "discard":
        return "paper", topk
    return ("topk_carry" if carry_residual else "topk_keep"), topk


def move_keys(tree: dict[str, Any]) -> list[str]:
    """Rewrite, in place, the keys of a config tree saved before they moved or were replaced
    (:data:`MOVED_KEYS`; FALQON's old merge keys as ``method.merge``, :func:`merge_recipe`); return
    what was rewritten (``old -> new``). A moved key the run's method does not have is dropped.
    :class:`ConfigError` for old merge keys beside ``method.merge`` or a merge no longer offered."""
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
    method = tree.get("method")
    if isinstance(method, dict) and method.get("name") == "falqon":
        moved += _merge_keys(method)
    return moved


def _merge_keys(method: dict[str, Any]) -> list[str]:
    """A saved ``method`` section (FALQON) without ``merge``: its old merge keys as the recipe."""
    removed = [key for key in REMOVED_MERGE_KEYS if key in method]
    if "merge" in method:
        if removed:
            raise ConfigError(
                f"method.{removed[0]} no longer exists: method.merge={method['merge']} says how B "
                f"is merged (every_row | topk_carry | topk_keep | paper); remove method.{removed[0]}"
            )
        return []
    given = {key: method.pop(key) for key in OLD_MERGE_KEYS if key in method}
    merge, topk = merge_recipe(**{**SAVED_CONFIG_DEFAULTS["falqon"], **given})
    method["merge"], method["topk"] = merge, topk
    old = (
        ", ".join(f"method.{key}={value!r}" for key, value in given.items())
        or "no merge keys (the paper's merge)"
    )
    return [f"{old} -> method.merge={merge}, method.topk={topk!r}"]


def _override_value(key: str, value: str) -> Any:
    """An old merge key's command-line value as the config value it was (``null``, a count, a bool)."""
    text = value.strip()
    if key == "carry_residual":
        return {"true": True, "false": False}.get(text.lower(), text)
    if key == "topk":
        if text.lower() in ("null", "none", "~"):
            return None
        try:
            return int(text)
        except ValueError:
            return text
    return text


def merge_overrides(argv: list[str]) -> tuple[list[str], str | None]:
    """Command-line overrides of FALQON's old merge keys, combined into one recipe.

    Without ``method.merge`` on the command line, ``method.topk`` / ``method.unmerged`` /
    ``method.carry_residual`` (each missing one at its former default, :data:`FORMER_DEFAULTS`)
    become ``method.merge=<recipe>`` and ``method.topk=<k or null>`` (:func:`merge_recipe`), placed
    where the first of them was. With ``method.merge``, ``method.topk`` is the new key and the removed
    keys are a :class:`ConfigError`. Returns the overrides and the notice to print (None: nothing
    mapped).
    """
    # key -> (position, the argument, its value): the last one counts
    old: dict[str, tuple[int, str, str]] = {}
    positions: list[int] = []  # every old merge key's argument, repeated ones too
    has_merge = False
    for index, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~")
        if sep and name == "method.merge":
            has_merge = True
        elif sep and name.startswith("method.") and name[len("method.") :] in OLD_MERGE_KEYS:
            old[name[len("method.") :]] = (index, arg, value)
            positions.append(index)
    removed = [key for key in REMOVED_MERGE_KEYS if key in old]
    if has_merge:
        if removed:
            raise ConfigError(
                f"method.{removed[0]} no longer exists: method.merge, given too, says how B is merged "
                f"(every_row | topk_carry | topk_keep | paper); drop {old[removed[0]][1]!r}"
            )
        return list(argv), None
    if not old:
        return list(argv), None
    values = {
        **FORMER_DEFAULTS,
        **{key: _override_value(key, value) for key, (_, _, value) in old.items()},
    }
    merge, topk = merge_recipe(**values)
    new = [f"method.merge={merge}", f"method.topk={_shown(topk)}"]
    out: list[str] = []
    for index, arg in enumerate(argv):
        if index == positions[0]:
            out += new
        elif index not in positions:
            out.append(arg)
    given = " ".join(arg for _, arg, _ in sorted(old.values()))
    assumed = [
        f"method.{key}={_shown(value)}" for key, value in FORMER_DEFAULTS.items() if key not in old
    ]
    notice = (
        f"FALQON's merge is one key now, method.merge: read {given}"
        + (f" (with the former defaults {' '.join(assumed)})" if assumed else "")
        + f" as {' '.join(new)}"
    )
    return out, notice


def _shown(value: Any) -> str:
    return (
        "true"
        if value is True
        else "false"
        if value is False
        else "null"
        if value is None
        else str(value)
    )
