"""Instrumentation for benchmarks and tests, never for training: FP8 casts and host synchronizations.

* :func:`count_casts` — every dynamic cast of the FP8 layers (FALQON, FP8 LoRA) goes through a
  backend's ``quantize``, so patching that method on the backend classes sees all of them.
* :class:`HostSyncCounter` — a ``TorchDispatchMode`` that counts the ATen operations which force
  the host to wait for the device: reading a value back (``aten._local_scalar_dense``, behind
  ``.item()``, ``int()``, ``bool()``, ``.tolist()``), and operations whose output shape depends on
  data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique`` …). On a CPU nothing waits,
  but the same operations would stall a GPU stream: counting them on CPU tells what a CUDA run pays.
  Under a dispatch mode the compiled FP8 casts take their eager path (same bits, same ops).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from falqon_dist.fp8.backends import _TorchCast
from falqon_dist.fp8.te_backend import TEBackend


@contextlib.contextmanager
def count_casts() -> Iterator[list[torch.dtype]]:
    """Within the context, append the FP8 format of every backend ``quantize`` call to the yielded list."""
    calls: list[torch.dtype] = []
    originals = [(cls, cls.quantize) for cls in (_TorchCast, TEBackend)]

    def counting(original):
        def quantize(self, x_hp, fp8_dtype, *, transpose=False):
            calls.append(fp8_dtype)
            return original(self, x_hp, fp8_dtype, transpose=transpose)

        return quantize

    for cls, original in originals:
        cls.quantize = counting(original)
    try:
        yield calls
    finally:
        for cls, original in originals:
            cls.quantize = original


#: ATen overload packets whose execution makes the host wait for the device.
_SYNC_OPS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist() of each element
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",  # with a tensor of repeats: output size from data
    "is_nonzero",
    "equal",
}


class HostSyncCounter(TorchDispatchMode):
    """Count host-synchronizing ATen ops run inside the context: ``total`` and ``by_op``.

    ``Tensor.tolist()`` reads memory without dispatching an op, so it is counted by wrapping it
    (as ``tolist``, once per call: one wait for the whole tensor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._tolist = None

    def __enter__(self):
        original, counter = torch.Tensor.tolist, self

        def tolist(tensor, *args, **kwargs):
            counter.by_op["tolist"] += 1
            return original(tensor, *args, **kwargs)

        self._tolist, torch.Tensor.tolist = original, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.by_op[name] += 1
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args):
            self.by_op[f"{name}[bool mask]"] += 1
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)
