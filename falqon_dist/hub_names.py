"""A model or data name: a local path, or a Hugging Face hub id — one rule, decided before any load.

transformers and datasets look up on the hub anything that is not an existing local path, so a
missing or mistyped local directory (``mymodels/llama`` typed in the wrong directory, a model moved
since training) became a hub request: a network wait and an error about the hub, after every rank
had started loading. Here a name is **local** when

* it exists here; or
* it looks like a path: it starts with ``/``, ``.`` or ``~``; or
* it has more than one ``/`` (a hub id has at most one: ``org/name``); or
* it contains ``os.sep`` and its first component exists here (``mymodels/llama`` when ``mymodels/``
  is a local directory);

and otherwise a **hub id** if it is a valid one (``name`` or ``org/name`` of letters, digits,
``-``, ``_`` and ``.``: huggingface_hub's own ``validate_repo_id``). A local name that does not
exist is an error naming it; so is a name that is neither. Used by
:mod:`falqon_dist.train.preflight` (``model.name_or_path``, ``data.path``, ``data.sources[i].path``),
:func:`falqon_dist.train.model_setup.resolve_model_path` and :mod:`falqon_dist.data.sources`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variables that put huggingface_hub (and so transformers and datasets) offline.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def local_reason(name: str) -> str | None:
    """Why ``name`` is a local path (a short phrase for error messages), or None if it is not one."""
    if os.path.lexists(Path(name).expanduser()):
        return "it exists here"
    if name.startswith(("/", ".", "~")):
        return f"it starts with {name[0]!r}"
    if name.count("/") > 1:
        return "it has more than one '/' (a hub id is 'org/name')"
    first = name.split(os.sep, 1)[0]
    if os.sep in name and first and os.path.lexists(first):
        return f"its first component {first + os.sep!r} exists here"
    return None


def is_local(name: str) -> bool:
    """True if ``name`` is a local path by the rule of this module (it need not exist)."""
    return local_reason(name) is not None


def hub_id_problem(name: str) -> str | None:
    """Why ``name`` is not a valid hub id (huggingface_hub's words), or None if it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        return str(error)
    return None


def hub_offline() -> bool:
    """True when huggingface_hub is offline: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set
    to a true value now, or was when huggingface_hub was imported (its own constant)."""
    from huggingface_hub import constants

    values = (os.environ.get(var, "") for var in OFFLINE_VARS)
    return bool(constants.HF_HUB_OFFLINE) or any(
        v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in values
    )
