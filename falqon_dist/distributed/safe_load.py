"""Reading checkpoint files without running code: ``torch.load(weights_only=True)`` and a short allowlist.

A ``.pt`` file is a pickle: loading one with ``weights_only=False`` (what DeepSpeed does) runs any
callable the file names, so a crafted ``mp_rank_00_model_states.pt`` in a run directory someone hands
you runs code as you. Every checkpoint read in falqon_dist goes through the one rule here:

* tensors, containers and plain values only (torch's ``weights_only`` unpickler), plus the few
  classes that files written by DeepSpeed and by us contain (:data:`ALLOWED`, found by
  ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-0…3 checkpoints of bf16, fp16 and
  fp32 runs): DeepSpeed's loss scalers, the ZeRO stage enum and the fragment address of its
  optimizer-state files. None of them runs code when it is rebuilt (plain attribute containers);
* a file that needs anything else is refused with :class:`UnsafeCheckpointError`, naming the file and
  the globals it asks for; nothing from it is used.

DeepSpeed's own reads are routed through the same rule without touching its source:
:class:`SafeCheckpointEngine` replaces the engine's ``TorchCheckpointEngine`` (its checkpoint engine
is pluggable: ``engine.checkpoint_engine`` is what ``load_checkpoint`` calls), and
:func:`weights_only_loads` covers the loaders that call ``torch.load`` directly
(``zero_to_fp32`` for ZeRO-3 exports) through torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

#: ``module.qualname`` of every class a DeepSpeed or falqon_dist checkpoint may hold beyond torch's
#: defaults (tests/unit/test_safe_load.py checks that each still exists and rebuilds without code).
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

#: What NumPy's RNG state needs (``np.random.get_state()`` holds an ndarray); allowed in the RNG
#: files of checkpoints written before they stored it as a tensor, and nowhere else.
NUMPY_ARRAY = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would need more than plain tensors and the allowlisted classes."""


def _resolve(qualname: str) -> Any | None:
    """The object ``module.name`` names, or None when it does not exist in this environment."""
    module_name, _, name = qualname.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[name])
    except ImportError:
        return None
    return getattr(module, name, None)


def allowed_globals(extra: Iterable[str] = ()) -> list[Any]:
    """The allowlisted classes (and ``extra``) that exist here, as objects for ``safe_globals``."""
    found = (_resolve(name) for name in (*ALLOWED, *extra))
    return [obj for obj in found if obj is not None]


def _refusal(path: Path, error: Exception) -> UnsafeCheckpointError:
    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a readable pickle at all: the unpickler's message says why
        wanted = []
    allowed = set(ALLOWED)
    wanted = [name for name in wanted if name not in allowed] or [_unpickler_reason(error)]
    return UnsafeCheckpointError(
        f"{path}: refused to load: it asks for {', '.join(wanted)}, and loading that could run code. "
        "falqon_dist reads checkpoints with torch.load(weights_only=True) and allows only tensors, plain "
        f"values and {len(ALLOWED)} DeepSpeed classes; a file written by falqon_dist or DeepSpeed needs no "
        "more, so this one was made or changed by something else — do not use it"
    )


def _unpickler_reason(error: Exception) -> str:
    """The one informative line of torch's weights-only error (what it could not build)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Can only build", "Unsupported global", "Unsupported operand")):
            return line
    return lines[0] if lines else type(error).__name__


def load_file(path: str | Path, map_location: Any = "cpu", *, extra: Iterable[str] = ()) -> Any:
    """``torch.load`` of ``path`` under the rule above; :class:`UnsafeCheckpointError` names a file
    that needs more (``extra``: further allowed globals for this one read)."""
    path = Path(path)
    with torch.serialization.safe_globals(allowed_globals(extra)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise _refusal(path, error) from None


@contextlib.contextmanager
def weights_only_loads(directory: str | Path | None = None) -> Iterator[None]:
    """Every ``torch.load`` inside is ``weights_only=True`` with the allowlist, whatever its caller
    passes (for library code that calls ``torch.load`` itself). A refused load is reported as
    :class:`UnsafeCheckpointError` naming the offending file of ``directory`` (searched only then)."""
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as error:
        culprit = _first_unsafe(Path(directory)) if directory is not None else None
        if culprit is not None:
            raise _refusal(culprit, error) from None
        raise UnsafeCheckpointError(
            f"{directory or 'a checkpoint file'}: refused to load ({error})"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def _first_unsafe(directory: Path) -> Path | None:
    """The first ``*.pt`` file under ``directory`` that the rule refuses."""
    allowed = set(ALLOWED)
    for path in sorted(directory.rglob("*.pt")):
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - unreadable: refused as well
            return path
        if any(name not in allowed for name in wanted) and not _only_numpy_rng(path, wanted):
            return path
    return None


def _only_numpy_rng(path: Path, wanted: list[str]) -> bool:
    return path.name.startswith("rng_rank") and all(name in NUMPY_ARRAY for name in wanted)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's ``TorchCheckpointEngine`` whose ``load`` is :func:`load_file`; saving unchanged."""

    @classmethod
    def like(cls, other: TorchCheckpointEngine) -> SafeCheckpointEngine:
        engine = cls(None)
        engine.zipfile_serialization = other.zipfile_serialization
        return engine

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location)


def use_safe_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_file`.

    DeepSpeed builds a ``TorchCheckpointEngine`` unless its config picks another writer; that one is
    replaced by :class:`SafeCheckpointEngine` with the same settings. Another kind of checkpoint
    engine (``checkpoint.writer`` in the DeepSpeed config) keeps its own loads, which
    :func:`falqon_dist.distributed.checkpoint.load` wraps in :func:`weights_only_loads` all the same.
    """
    if type(getattr(engine, "checkpoint_engine", None)) is TorchCheckpointEngine:
        engine.checkpoint_engine = SafeCheckpointEngine.like(engine.checkpoint_engine)
