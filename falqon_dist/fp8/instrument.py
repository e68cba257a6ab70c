"""Instrumentation for benchmarks and tests, never for training: FP8 casts and host synchronizations.

* :func:`count_casts` — every dynamic cast of the FP8 layers (FALQON, FP8 LoRA) goes through a
  backend's ``quantize``, so patching that method on the backend classes sees all of them.
* :class:`HostSyncCounter` — a ``TorchDispatchMode`` that counts the ATen operations which force
  the host to wait for the device: reading a value back (``aten._local_scalar_dense``, behind
  ``.item()``, ``int()``, ``bool()``, ``.tolist()``), and operations whose output shape depends on
  data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique`` …). On a CPU nothing waits,
  but the same operations would stall a GPU stream: counting them on CPU tells what a CUDA run pays.
  Under a dispatch mode the compiled FP8 casts take their eager path (same bits, same ops).
* :class:`OpTraffic` — a ``TorchDispatchMode`` that adds up what every ATen op reads and writes
  (bytes of its tensor inputs and outputs; views move nothing) and the largest tensor an op
  creates: the memory traffic and the largest temporary of eager code, op by op.
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
        cls.quantize = counting(original)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for cls, original in originals:
            cls.quantize = original  # type: ignore[method-assign]


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
#: Indexing ops that synchronize when an index is a boolean mask (its count of True sets the shape).
_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")


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
        elif name in _INDEX_OPS and _has_bool_index(args):
            self.by_op[f"{name}[bool mask]"] += 1
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool
        for i in (indices or ())
        if i is not None
    )


class OpTraffic(TorchDispatchMode):
    """Bytes the ATen ops inside the context read and write, and the largest tensor one creates.

    ``ops``: ops run (views excluded: they move no data); ``bytes_read`` / ``bytes_written``: the
    sizes of their tensor inputs and outputs (an in-place op writes its first argument);
    ``largest_output``: the biggest tensor an op produced, in bytes (in-place results excluded:
    they are not new). Eager traffic is an upper bound of what a fused kernel moves, and what an
    eager implementation really costs on a GPU, where every op is a kernel reading and writing memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.bytes_read = self.bytes_written = self.largest_output = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        inputs = [
            t
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        ]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_place = func._schema.name.endswith("_") or "out" in kwargs
        self.ops += 1
        self.bytes_read += sum(
            _nbytes(t)
            for t in (inputs[1:] if in_place and func._schema.name.endswith("_") else inputs)
        )
        self.bytes_written += sum(_nbytes(t) for t in outputs)
        if not in_place:
            for t in outputs:
                if _nbytes(t) > self.largest_output:
                    self.largest_output, self.largest_op = _nbytes(t), func.overloadpacket.__name__
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
