"""Streaming safetensors writer: tensors go to disk shard by shard, in Hugging Face's layout.

One shard → ``model.safetensors``. Several → ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": …}, "weight_map": {name: file}}``).
At most one shard's worth of tensors is held in memory; the number of shards is only known at the end,
so shards are written under temporary names and renamed by :meth:`ShardWriter.finish`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int or a string such as ``"2GB"`` (10⁹, as transformers) or ``"512MiB"``."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"max_shard_size must look like 2GB, 500MB, 1GiB or a byte count; got {size!r}"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    return value


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` takes in a safetensors file."""
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Append named tensors; a shard is written as soon as the next tensor would overflow it.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own (as in ``save_pretrained``).
    Tensors handed to :meth:`add` must own their memory (or outlive the writer): they are kept until
    their shard is flushed.
    """

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._keys: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under checkpoint key ``name`` (keys must be unique)."""
        if name in self._keys:
            raise ValueError(f"duplicate checkpoint key {name!r}")
        self._keys.add(name)
        size = nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    @property
    def num_tensors(self) -> int:
        """Tensors added so far."""
        return len(self._keys)

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name, write the index; return the files."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = self.directory / SINGLE_FILE
            self._shards[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, keys) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files
