"""Reading checkpoints in the release's format.

`CheckpointReader(path)` reads `config.json` and `model.safetensors.index.json` and then reads
tensors lazily by name (`get`, `get_slice`, `read_many`), counting the tensor bytes it actually
reads in `bytes_read` (ranks use it to show they read only their share).

`read_header(file)` parses one shard's safetensors header (8-byte little-endian length + JSON)
without reading tensor data; `load_index(dir)` reads the index (or, for a single-file
checkpoint, builds the map from its header). Validation (`ds3dist.checkpoint.validation`) and
the inspect summary (`ds3dist.checkpoint.summary`) are built on these two.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds3dist.checkpoint.layout import DTYPE_BYTES, TensorSpec
from ds3dist.config import ConfigError, ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message names the file and the tensor."""


# ---- safetensors headers -------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # data offsets, relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    file: str
    entries: dict[str, HeaderEntry]
    data_start: int  # 8 + header length
    file_size: int
    metadata: dict[str, str]


class HeaderError(ValueError):
    """A shard header is truncated or corrupt (kind: 'corrupt_header' or 'truncated_shard')."""

    def __init__(self, kind: str, message: str, tensor: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.tensor = tensor


def read_header(path: str | Path) -> ShardHeader:
    """Parse a safetensors header (first 8 bytes: little-endian u64 length, then JSON).

    Checks every entry (known dtype, data_offsets consistent with shape and dtype, entries
    contiguous) and that the file is as long as the offsets say. Raises HeaderError.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("corrupt_header", f"file is {size} bytes, shorter than the 8-byte "
                              f"header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise HeaderError("corrupt_header", f"header length {n} is implausible (> 100 MB)")
        if 8 + n > size:
            raise HeaderError("corrupt_header", f"header length {n} runs past the end of the "
                              f"file ({size} bytes): truncated header")
        raw = f.read(n)
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError("corrupt_header", f"header is not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise HeaderError("corrupt_header", "header JSON is not an object")
    meta = h.pop("__metadata__", {}) or {}
    entries: dict[str, HeaderEntry] = {}
    for name, e in h.items():
        try:
            dtype = e["dtype"]
            shape = tuple(int(x) for x in e["shape"])
            start, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HeaderError("corrupt_header", f"header entry is malformed: {e!r}", name) from None
        if dtype not in DTYPE_BYTES:
            raise HeaderError("corrupt_header", f"unknown dtype {dtype!r}", name)
        if any(d < 0 for d in shape) or start < 0 or end < start:
            raise HeaderError("corrupt_header", f"bad shape {list(shape)} or data_offsets "
                              f"[{start}, {end}]", name)
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - start != want:
            raise HeaderError("corrupt_header", f"data_offsets [{start}, {end}] hold {end - start} "
                              f"bytes but {dtype} {list(shape)} needs {want}", name)
        entries[name] = HeaderEntry(name, dtype, shape, start, end)
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise HeaderError("corrupt_header", f"data_offsets start at {e.start}, expected {pos} "
                              f"(entries overlap or leave a gap)", e.name)
        pos = e.end
    data_start = 8 + n
    if data_start + pos > size:
        last = max(entries.values(), key=lambda e: e.end).name if entries else None
        raise HeaderError("truncated_shard", f"file is {size} bytes but the header's data_offsets "
                          f"need {data_start + pos}: truncated", last)
    return ShardHeader(path.name, entries, data_start, size, dict(meta))


# ---- the reader ------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy, by-name access to a checkpoint directory (config.json + index + shards)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        try:
            self.config = ModelConfig.from_json(self.path / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(f"{CONFIG_NAME}: {e}") from None
        self.weight_map, self.total_size = load_index(self.path)
        self.bytes_read = 0
        self._handles: dict[str, Any] = {}

    # names and places
    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{INDEX_NAME}: no tensor {name!r} in the index") from None

    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype from the shard header (reads no tensor data)."""
        f = self._open(name)
        try:
            sl = f.get_slice(name)
            return TensorSpec(name, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{self.shard_of(name)}: tensor {name!r}: {e}") from None

    # reads
    def get(self, name: str) -> torch.Tensor:
        f = self._open(name)
        try:
            t = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.shard_of(name)}: cannot read tensor {name!r}: {e}") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get_slice(self, name: str, *slices: slice | int) -> torch.Tensor:
        """`tensor[slices]` reading only those elements, e.g. get_slice(n, slice(0, 128)) = rows."""
        f = self._open(name)
        try:
            t = f.get_slice(name)[tuple(slices) if len(slices) != 1 else slices[0]]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.shard_of(name)}: cannot read slice {slices!r} of tensor "
                                  f"{name!r}: {e}") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read several tensors, opening each needed shard once (grouped by shard)."""
        names = list(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_shard[self.shard_of(n)].append(n)
        out: dict[str, torch.Tensor] = {}
        for shard, group in by_shard.items():
            for n in group:
                out[n] = self.get(n)
            self._close_shard(shard)
        return {n: out[n] for n in names}

    # handles
    def _open(self, name: str):
        shard = self.shard_of(name)
        f = self._handles.get(shard)
        if f is None:
            p = self.path / shard
            if not p.is_file():
                raise CheckpointError(f"{shard}: shard file is missing (needed for tensor {name!r})")
            from safetensors import safe_open

            try:
                f = safe_open(str(p), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{shard}: cannot open shard (needed for tensor {name!r}): "
                                      f"{e}") from None
            self._handles[shard] = f
        return f

    def _close_shard(self, shard: str) -> None:
        f = self._handles.pop(shard, None)
        if f is not None and hasattr(f, "__exit__"):
            f.__exit__(None, None, None)

    def close(self) -> None:
        for shard in list(self._handles):
            self._close_shard(shard)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_index(path: Path) -> tuple[dict[str, str], int | None]:
    """weight_map and total_size; a single-file checkpoint gets a map from its header."""
    ip = path / INDEX_NAME
    if not ip.is_file():
        single = path / SINGLE_FILE
        if single.is_file():
            try:
                h = read_header(single)
            except HeaderError as e:
                raise CheckpointError(f"{SINGLE_FILE}: {e}") from None
            return {n: SINGLE_FILE for n in h.entries}, sum(e.nbytes for e in h.entries.values())
        raise CheckpointError(f"{INDEX_NAME}: missing from {path}")
    try:
        d = json.loads(ip.read_text())
        wm = d["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{INDEX_NAME}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{INDEX_NAME}: no valid weight_map ({e})") from None
    total = (d.get("metadata") or {}).get("total_size")
    return dict(wm), total
