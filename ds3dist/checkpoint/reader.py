"""Reading and validating checkpoints in the release's format.

`CheckpointReader(path)` reads `config.json` and `model.safetensors.index.json` and then reads
tensors lazily by name (`get`, `get_slice`, `read_many`), counting the tensor bytes it actually
reads in `bytes_read` (ranks use it to show they read only their share).

`validate(path)` checks a checkpoint against the expected-tensor table of its config and reports
every problem at once as `Problem(kind, file, tensor, message)`. It reads only the config, the
index and the shard headers (8-byte little-endian length + JSON), never tensor data, so the
688 GB release validates in seconds. `summary(path)` counts parameters and bytes per component
for `python -m ds3dist.checkpoint.inspect`.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds3dist.checkpoint.layout import (
    DTYPE_BYTES,
    SCALE_SUFFIX,
    TensorSpec,
    expected_tensors,
    expert_of,
    layer_of,
)
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
        self.weight_map, self.total_size = _load_index(self.path)
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


def _load_index(path: Path) -> tuple[dict[str, str], int | None]:
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


# ---- validation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. kind is a short tag (see KINDS)."""

    kind: str
    file: str | None
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = self.file or "<checkpoint>"
        if self.tensor:
            where += f": tensor {self.tensor}"
        return f"[{self.kind}] {where}: {self.message}"


KINDS = {
    "no_directory": "the path is not a directory",
    "config": "config.json missing or invalid",
    "index": "model.safetensors.index.json missing or invalid",
    "missing_shard": "the index points at a shard file that does not exist",
    "corrupt_header": "a shard header is truncated or not valid safetensors",
    "truncated_shard": "a shard is shorter than its header's data_offsets say",
    "not_in_index": "a tensor is in a shard but not in the index",
    "wrong_shard": "the index names one shard but the tensor is in another",
    "not_in_shard": "the index names a shard that does not hold the tensor",
    "duplicate_tensor": "a tensor is stored in more than one shard",
    "total_size": "metadata.total_size differs from the tensor data bytes",
    "missing_tensor": "an expected tensor is absent",
    "unexpected_tensor": "a tensor the config does not expect",
    "wrong_shape": "a tensor has the wrong shape",
    "wrong_dtype": "a tensor has the wrong dtype",
    "missing_scale": "an FP8 weight without its _scale_inv",
    "orphan_scale": "a _scale_inv without its weight",
}


def validate(path: str | Path) -> list[Problem]:
    """Every problem of the checkpoint at `path` (empty list: valid). Reads headers only."""
    path = Path(path)
    if not path.is_dir():
        return [Problem("no_directory", str(path), None, "no such checkpoint directory")]
    problems: list[Problem] = []

    def add(kind: str, file: str | None, tensor: str | None, message: str) -> None:
        problems.append(Problem(kind, file, tensor, message))

    # config
    cfg: ModelConfig | None = None
    try:
        cfg = ModelConfig.from_json(path / CONFIG_NAME)
    except ConfigError as e:
        add("config", CONFIG_NAME, None, str(e))

    # index
    weight_map: dict[str, str] | None = None
    total_size = None
    ip = path / INDEX_NAME
    if ip.is_file():
        try:
            d = json.loads(ip.read_text())
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            add("index", INDEX_NAME, None, f"not valid JSON ({e})")
        else:
            wm = d.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                add("index", INDEX_NAME, None, "no weight_map mapping tensor names to shard files")
            else:
                weight_map = wm
            total_size = (d.get("metadata") or {}).get("total_size")
            if total_size is None:
                add("total_size", INDEX_NAME, None, "metadata.total_size is missing")
    elif (path / SINGLE_FILE).is_file():
        weight_map = None  # single-file checkpoint: the header is the map
    else:
        add("index", INDEX_NAME, None, "missing: no index and no model.safetensors")

    # shard headers: every shard the index names, plus any other *.safetensors in the directory
    index_shards = list(dict.fromkeys(weight_map.values())) if weight_map else []
    on_disk = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
    headers: dict[str, ShardHeader] = {}
    bad_shards: set[str] = set()
    for shard in index_shards + [s for s in on_disk if s not in index_shards]:
        p = path / shard
        if not p.is_file():
            names = [n for n, s in weight_map.items() if s == shard] if weight_map else []
            add("missing_shard", shard, names[0] if names else None,
                f"shard file is missing; the index maps {len(names)} tensors to it "
                f"(first: {', '.join(names[:3])})")
            bad_shards.add(shard)
            continue
        try:
            headers[shard] = read_header(p)
        except HeaderError as e:
            add(e.kind, shard, e.tensor, str(e))
            bad_shards.add(shard)
    if weight_map is None and not ip.is_file() and SINGLE_FILE in headers:
        weight_map = {n: SINGLE_FILE for n in headers[SINGLE_FILE].entries}

    # where each tensor actually is
    found: dict[str, list[str]] = defaultdict(list)
    for shard, h in headers.items():
        for n in h.entries:
            found[n].append(shard)
    for n, shards in found.items():
        if len(shards) > 1:
            add("duplicate_tensor", shards[1], n, f"stored in {len(shards)} shards: "
                f"{', '.join(shards)}")
    if weight_map is not None:
        for n, shard in weight_map.items():
            if shard in bad_shards:
                continue  # already reported for the whole shard
            if n in headers[shard].entries:
                continue
            if found.get(n):
                add("wrong_shard", shard, n, f"the index says {shard} but the tensor is in "
                    f"{', '.join(found[n])}")
            else:
                add("not_in_shard", shard, n, f"the index says {shard} but that shard does not "
                    f"hold the tensor")
        for n, shards in found.items():
            if n not in weight_map:
                add("not_in_index", shards[0], n, f"tensor is in shard {shards[0]} but not in "
                    f"{INDEX_NAME}")

    # total_size: data bytes of every tensor stored in the indexed shards (each tensor once)
    if weight_map is not None and isinstance(total_size, int) and not bad_shards:
        actual = sum(headers[shards[0]].entries[n].nbytes for n, shards in found.items()
                     if shards[0] in index_shards)
        if actual != total_size:
            add("total_size", INDEX_NAME, None, f"metadata.total_size is {total_size} but the "
                f"shards hold {actual} bytes of tensor data")
    elif total_size is not None and not isinstance(total_size, int):
        add("total_size", INDEX_NAME, None, f"metadata.total_size is not an integer: {total_size!r}")

    # what the checkpoint holds: index names (with header info where readable)
    present: dict[str, HeaderEntry | None] = {}
    file_of: dict[str, str] = {}
    for n, shards in found.items():
        present[n] = headers[shards[0]].entries[n]
        file_of[n] = shards[0]
    if weight_map is not None:
        for n, s in weight_map.items():
            if n not in present:
                present[n] = None  # its shard is missing or unreadable: presence only
                file_of[n] = s
            elif s in headers and n in headers[s].entries:
                present[n] = headers[s].entries[n]
                file_of[n] = s

    # FP8 pairing (the release's rule, independent of the config)
    paired: set[str] = set()
    for n, e in present.items():
        if n.endswith(SCALE_SUFFIX):
            w = n[: -len(SCALE_SUFFIX)]
            if w not in present:
                add("orphan_scale", file_of[n], n, f"scale without its weight {w}")
                paired.add(w)
        elif e is not None and e.dtype == "F8_E4M3" and n + SCALE_SUFFIX not in present:
            add("missing_scale", file_of[n], n, f"FP8 weight without its scale {n + SCALE_SUFFIX}")
            paired.add(n + SCALE_SUFFIX)

    # against the expected table
    if cfg is not None:
        expected = expected_tensors(cfg, mtp=cfg.num_nextn_predict_layers > 0)
        missing = [n for n in expected if n not in present and n not in paired]
        for n in missing:
            add("missing_tensor", INDEX_NAME, n, f"expected {expected[n].dtype} {list(expected[n].shape)} "
                f"is in no shard and not in the index")
        for n, e in present.items():
            spec = expected.get(n)
            if spec is None:
                if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in present:
                    continue  # reported as orphan_scale
                why = "the config does not expect this tensor"
                if n.endswith(SCALE_SUFFIX) and not cfg.is_fp8:
                    why += " (config.json has no quantization_config: a bf16 checkpoint)"
                add("unexpected_tensor", file_of[n], n, why)
                continue
            if e is None:
                continue
            if e.shape != spec.shape:
                add("wrong_shape", file_of[n], n, f"shape {list(e.shape)}, expected "
                    f"{list(spec.shape)}")
            if e.dtype != spec.dtype:
                add("wrong_dtype", file_of[n], n, f"dtype {e.dtype}, expected {spec.dtype}")
    return problems


# ---- summary -----------------------------------------------------------------------------------
COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "gate",
              "norms", "head", "mtp")


def component_of(name: str, cfg: ModelConfig) -> str:
    """Which part of the model a tensor belongs to (scales go with their weight)."""
    layer = layer_of(name)
    if layer is not None and layer >= cfg.num_hidden_layers:
        return "mtp"
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if name.endswith(("norm.weight",)):
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if expert_of(name) is not None:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "gate"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def summary(path: str | Path) -> dict[str, Any]:
    """Counts for inspect: layers, layer kinds, experts, dtypes, params/bytes per component.

    Uses the shard headers where readable, else the expected table for the index's names.
    """
    path = Path(path)
    cfg = ModelConfig.from_json(path / CONFIG_NAME)  # ConfigError if unusable
    expected = expected_tensors(cfg, mtp=True)
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            h = read_header(p)
        except (HeaderError, OSError):
            continue
        for n, e in h.entries.items():
            specs.setdefault(n, (e.dtype, e.shape))
    try:
        wm, _ = _load_index(path)
        for n in wm:
            if n not in specs and n in expected:
                specs[n] = (expected[n].dtype, expected[n].shape)
    except CheckpointError:
        pass
    comps = {c: {"params": 0, "bytes": 0, "tensors": 0} for c in COMPONENTS}
    dtypes: Counter = Counter()
    dtype_bytes: Counter = Counter()
    mtp_copies = 0  # the MTP layer's second copies of the embedding and head
    for n, (dt, shape) in specs.items():
        c = component_of(n, cfg)
        if c == "mtp" and n.endswith((".embed_tokens.weight", ".shared_head.head.weight")):
            mtp_copies += math.prod(shape)
        comps.setdefault(c, {"params": 0, "bytes": 0, "tensors": 0})
        nb = math.prod(shape) * DTYPE_BYTES.get(dt, 0)
        comps[c]["bytes"] += nb
        comps[c]["tensors"] += 1
        if not n.endswith(SCALE_SUFFIX):
            comps[c]["params"] += math.prod(shape)
        dtypes[dt] += 1
        dtype_bytes[dt] += nb
    mtp_ids = cfg.mtp_layer_ids
    return {
        "path": str(path),
        "format": "fp8" if cfg.is_fp8 else "bf16",
        "layers": cfg.num_hidden_layers,
        "dense_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)],
        "moe_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)],
        "mtp_layers": mtp_ids,
        "routed_experts": cfg.n_routed_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "tensors": len(specs),
        "shards": len(list(path.glob("*.safetensors"))),
        "dtypes": {d: {"tensors": dtypes[d], "bytes": dtype_bytes[d]} for d in sorted(dtypes)},
        "components": comps,
        "total_params": sum(c["params"] for c in comps.values()),
        "main_params": sum(v["params"] for c, v in comps.items() if c != "mtp"),
        "mtp_unique_params": comps["mtp"]["params"] - mtp_copies,
        "total_bytes": sum(c["bytes"] for c in comps.values()),
    }


def _fmt_n(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"checkpoint {s['path']} ({s['format']}, {s['shards']} shards, {s['tensors']} tensors)",
        f"layers {s['layers']}: dense {_ranges(s['dense_layers'])}, MoE {_ranges(s['moe_layers'])}, "
        f"MTP {_ranges(s['mtp_layers'])}",
        f"experts: {s['routed_experts']} routed, {s['shared_experts']} shared, "
        f"{s['experts_per_token']} per token",
        "dtypes: " + ", ".join(f"{d} {v['tensors']} tensors {_fmt_n(v['bytes'])}B"
                               for d, v in s["dtypes"].items()),
        f"{'component':<16}{'params':>12}{'bytes':>12}{'tensors':>9}",
    ]
    for c, v in s["components"].items():
        lines.append(f"{c:<16}{_fmt_n(v['params']):>12}{_fmt_n(v['bytes']):>12}{v['tensors']:>9}")
    lines.append(f"{'total':<16}{_fmt_n(s['total_params']):>12}{_fmt_n(s['total_bytes']):>12}"
                 f"{s['tensors']:>9}")
    lines.append(f"main model {_fmt_n(s['main_params'])} params; MTP adds "
                 f"{_fmt_n(s['mtp_unique_params'])} unique (its embedding and head are copies)")
    return "\n".join(lines)
