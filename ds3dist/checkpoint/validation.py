"""Validating a checkpoint against the expected-tensor table of its config.

`validate(path)` reports every problem at once as `Problem(kind, file, tensor, message)` (the
kinds are listed in `KINDS`). It reads only the config, the index and the shard headers
(8-byte little-endian length + JSON), never tensor data, so the 688 GB release validates in
seconds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ds3dist.checkpoint.layout import SCALE_SUFFIX, expected_tensors
from ds3dist.checkpoint.reader import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE,
    HeaderEntry,
    HeaderError,
    ShardHeader,
    read_header,
)
from ds3dist.config import ConfigError, ModelConfig


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
    # found by verify (ds3dist.checkpoint.verify), which reads the tensor data
    "manifest": "SHA256SUMS has a malformed line, or lists a file that is missing",
    "checksum": "a file's sha256 differs from the one SHA256SUMS lists",
    "read_error": "a file cannot be read to its end",
    "nonfinite": "a weight holds NaN or Inf values",
    "bad_scale": "a _scale_inv holds non-finite or <= 0 values",
}


def validate(path: str | Path) -> list[Problem]:
    """Every problem of the checkpoint at `path` (empty list: valid). Reads headers only."""
    path = Path(path)
    if not path.is_dir():
        return [Problem("no_directory", str(path), None, "no such checkpoint directory")]
    v = _Validation(path)
    cfg = v.config()
    weight_map, total_size = v.index()
    headers, bad_shards, weight_map = v.headers(weight_map)
    found = v.placement(headers, weight_map, bad_shards)
    v.total_size(headers, weight_map, total_size, found, bad_shards)
    present, file_of = _present(headers, weight_map, found)
    paired = v.fp8_pairs(present, file_of)
    if cfg is not None:
        v.against_expected(cfg, present, file_of, paired)
    return v.problems


class _Validation:
    """The checks of `validate`, in order, each adding to `problems`."""

    def __init__(self, path: Path):
        self.path = path
        self.problems: list[Problem] = []
        self.index_shards: list[str] = []

    def add(self, kind: str, file: str | None, tensor: str | None, message: str) -> None:
        self.problems.append(Problem(kind, file, tensor, message))

    def config(self) -> ModelConfig | None:
        try:
            return ModelConfig.from_json(self.path / CONFIG_NAME)
        except ConfigError as e:
            self.add("config", CONFIG_NAME, None, str(e))
            return None

    def index(self) -> tuple[dict[str, str] | None, object]:
        """(weight_map, metadata.total_size); weight_map None: no usable index."""
        ip = self.path / INDEX_NAME
        if not ip.is_file():
            if not (self.path / SINGLE_FILE).is_file():
                self.add("index", INDEX_NAME, None, "missing: no index and no model.safetensors")
            return None, None  # a single-file checkpoint: its header is the map
        try:
            d = json.loads(ip.read_text())
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            self.add("index", INDEX_NAME, None, f"not valid JSON ({e})")
            return None, None
        weight_map = d.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            self.add("index", INDEX_NAME, None, "no weight_map mapping tensor names to shard files")
            weight_map = None
        total_size = (d.get("metadata") or {}).get("total_size")
        if total_size is None:
            self.add("total_size", INDEX_NAME, None, "metadata.total_size is missing")
        return weight_map, total_size

    def headers(self, weight_map: dict[str, str] | None
                ) -> tuple[dict[str, ShardHeader], set[str], dict[str, str] | None]:
        """Headers of every shard the index names plus any other *.safetensors here; the
        shards missing or unreadable; the weight map (a single file's header without index)."""
        self.index_shards = list(dict.fromkeys(weight_map.values())) if weight_map else []
        on_disk = sorted(p.name for p in self.path.glob("*.safetensors") if p.is_file())
        headers: dict[str, ShardHeader] = {}
        bad_shards: set[str] = set()
        for shard in self.index_shards + [s for s in on_disk if s not in self.index_shards]:
            p = self.path / shard
            if not p.is_file():
                names = [n for n, s in weight_map.items() if s == shard] if weight_map else []
                self.add("missing_shard", shard, names[0] if names else None,
                         f"shard file is missing; the index maps {len(names)} tensors to it "
                         f"(first: {', '.join(names[:3])})")
                bad_shards.add(shard)
                continue
            try:
                headers[shard] = read_header(p)
            except HeaderError as e:
                self.add(e.kind, shard, e.tensor, str(e))
                bad_shards.add(shard)
        if weight_map is None and not (self.path / INDEX_NAME).is_file() \
                and SINGLE_FILE in headers:
            weight_map = {n: SINGLE_FILE for n in headers[SINGLE_FILE].entries}
        return headers, bad_shards, weight_map

    def placement(self, headers: dict[str, ShardHeader], weight_map: dict[str, str] | None,
                  bad_shards: set[str]) -> dict[str, list[str]]:
        """Where each tensor actually is (name -> shards), checked against the index."""
        found: dict[str, list[str]] = defaultdict(list)
        for shard, h in headers.items():
            for n in h.entries:
                found[n].append(shard)
        for n, shards in found.items():
            if len(shards) > 1:
                self.add("duplicate_tensor", shards[1], n, f"stored in {len(shards)} shards: "
                         f"{', '.join(shards)}")
        if weight_map is None:
            return found
        for n, shard in weight_map.items():
            if shard in bad_shards or n in headers[shard].entries:
                continue  # reported for the whole shard, or where the index says
            if found.get(n):
                self.add("wrong_shard", shard, n, f"the index says {shard} but the tensor is in "
                         f"{', '.join(found[n])}")
            else:
                self.add("not_in_shard", shard, n, f"the index says {shard} but that shard does "
                         f"not hold the tensor")
        for n, shards in found.items():
            if n not in weight_map:
                self.add("not_in_index", shards[0], n, f"tensor is in shard {shards[0]} but not "
                         f"in {INDEX_NAME}")
        return found

    def total_size(self, headers, weight_map, total_size, found, bad_shards) -> None:
        """Data bytes of every tensor stored in the indexed shards (each tensor once)."""
        if weight_map is not None and isinstance(total_size, int) and not bad_shards:
            actual = sum(headers[shards[0]].entries[n].nbytes for n, shards in found.items()
                         if shards[0] in self.index_shards)
            if actual != total_size:
                self.add("total_size", INDEX_NAME, None, f"metadata.total_size is {total_size} "
                         f"but the shards hold {actual} bytes of tensor data")
        elif total_size is not None and not isinstance(total_size, int):
            self.add("total_size", INDEX_NAME, None,
                     f"metadata.total_size is not an integer: {total_size!r}")

    def fp8_pairs(self, present: dict[str, HeaderEntry | None], file_of: dict[str, str]
                  ) -> set[str]:
        """FP8 weights and scales each without the other (the release's rule, independent
        of the config); the names already reported that way."""
        paired: set[str] = set()
        for n, e in present.items():
            if n.endswith(SCALE_SUFFIX):
                w = n[: -len(SCALE_SUFFIX)]
                if w not in present:
                    self.add("orphan_scale", file_of[n], n, f"scale without its weight {w}")
                    paired.add(w)
            elif e is not None and e.dtype == "F8_E4M3" and n + SCALE_SUFFIX not in present:
                self.add("missing_scale", file_of[n], n,
                         f"FP8 weight without its scale {n + SCALE_SUFFIX}")
                paired.add(n + SCALE_SUFFIX)
        return paired

    def against_expected(self, cfg: ModelConfig, present: dict[str, HeaderEntry | None],
                         file_of: dict[str, str], paired: set[str]) -> None:
        expected = expected_tensors(cfg, mtp=cfg.num_nextn_predict_layers > 0)
        for n in expected:
            if n not in present and n not in paired:
                self.add("missing_tensor", INDEX_NAME, n, f"expected {expected[n].dtype} "
                         f"{list(expected[n].shape)} is in no shard and not in the index")
        for n, e in present.items():
            spec = expected.get(n)
            if spec is None:
                if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in present:
                    continue  # reported as orphan_scale
                why = "the config does not expect this tensor"
                if n.endswith(SCALE_SUFFIX) and not cfg.is_fp8:
                    why += " (config.json has no quantization_config: a bf16 checkpoint)"
                self.add("unexpected_tensor", file_of[n], n, why)
            elif e is not None:
                if e.shape != spec.shape:
                    self.add("wrong_shape", file_of[n], n, f"shape {list(e.shape)}, expected "
                             f"{list(spec.shape)}")
                if e.dtype != spec.dtype:
                    self.add("wrong_dtype", file_of[n], n, f"dtype {e.dtype}, expected {spec.dtype}")


def _present(headers: dict[str, ShardHeader], weight_map: dict[str, str] | None,
             found: dict[str, list[str]]) -> tuple[dict[str, HeaderEntry | None], dict[str, str]]:
    """What the checkpoint holds: name -> header entry (None: named by the index but its
    shard is missing or unreadable) and the file it is in."""
    present: dict[str, HeaderEntry | None] = {}
    file_of: dict[str, str] = {}
    for n, shards in found.items():
        present[n] = headers[shards[0]].entries[n]
        file_of[n] = shards[0]
    for n, s in (weight_map or {}).items():
        if n not in present:
            present[n] = None
            file_of[n] = s
        elif s in headers and n in headers[s].entries:
            present[n] = headers[s].entries[n]
            file_of[n] = s
    return present, file_of
