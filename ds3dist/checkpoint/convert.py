"""Convert checkpoints between FP8 (the release) and bf16, streaming shard by shard.

`convert(src, dst, to="bf16")` dequantizes every FP8 weight with `fp8.weight_dequant` into bf16
and drops the `_scale_inv` tensors and `quantization_config`; `to="fp8"` quantizes exactly the
weights the layout says are FP8 with `fp8.weight_quant` and adds their scales right after them
in the same shard. Each source shard becomes the output shard of the same name: its header is
computed from the source header, then tensors are read, converted and written one at a time,
so peak memory is about one tensor (at most one shard). The index is rewritten with the new
total_size; tokenizer files, generation_config.json and any other side files are copied, and
a new `SHA256SUMS` lists every output file (shards hashed as they are written).

The source is validated first. The output is written into a temporary directory beside DST and
renamed into place at the end, so a failed conversion leaves nothing half-written. A non-empty
DST is refused unless force=True.

CLI: python -m ds3dist.checkpoint.convert --to bf16|fp8 SRC DST [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ds3dist.checkpoint import fp8
from ds3dist.checkpoint._callable import make_module_callable
from ds3dist.checkpoint.layout import SCALE_SUFFIX, TensorSpec, expected_tensors
from ds3dist.checkpoint.reader import (
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    read_header,
)
from ds3dist.checkpoint.synthesize import write_json, write_shard
from ds3dist.checkpoint.validation import validate
from ds3dist.checkpoint.verify import MANIFEST, sha256_file, write_manifest
from ds3dist.config import preset



def _plan(src_specs: list[TensorSpec], to: str, dst_table: dict[str, TensorSpec]) -> list[TensorSpec]:
    """Output specs of one shard, in the source order (scales dropped or added after weights)."""
    out: list[TensorSpec] = []
    for s in src_specs:
        if to == "bf16":
            if s.is_scale:
                continue
            out.append(TensorSpec(s.name, s.shape, "BF16" if s.dtype == "F8_E4M3" else s.dtype))
        else:
            scale = dst_table.get(s.name + SCALE_SUFFIX)
            if scale is not None:
                out.append(TensorSpec(s.name, s.shape, "F8_E4M3"))
                out.append(scale)
            else:
                out.append(s)
    return out


def _produce(reader: CheckpointReader, specs: list[TensorSpec], to: str, block: tuple[int, int]):
    """Yield the converted tensors of `specs` in order (one or two in memory at a time)."""
    pending_scale: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.is_scale:  # to == "fp8": made together with its weight just before
            yield pending_scale.pop(s.name)
            continue
        t = reader.get(s.name)
        if to == "bf16" and t.dtype == fp8.FP8_DTYPE:
            scale = reader.get(s.name + SCALE_SUFFIX)
            t = fp8.weight_dequant(t, scale, block, dtype=torch.bfloat16)
        elif to == "fp8" and s.dtype == "F8_E4M3" and t.dtype != fp8.FP8_DTYPE:
            t, pending_scale[s.name + SCALE_SUFFIX] = fp8.weight_quant(t, block)
        yield t
        del t


def _check_dst(dst: Path, force: bool) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise FileExistsError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()) and not force:
            raise FileExistsError(f"{dst}: directory is not empty (use force=True / --force "
                                  f"to overwrite)")


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "bf16",
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert checkpoint `src` to `to` ('bf16' or 'fp8') into `dst`; returns dst as a Path.

    Raises CheckpointError (listing every problem) if src is invalid or already in `to`'s format,
    FileExistsError if dst is non-empty and not force.
    """
    src, dst = Path(src), Path(dst)
    if to not in ("bf16", "fp8"):
        raise ValueError(f"to must be 'bf16' or 'fp8', got {to!r}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: destination is the source")
    _check_dst(dst, force)
    problems = validate(src)
    if problems:
        raise CheckpointError(f"{src}: not a valid checkpoint, {len(problems)} problem(s):\n  "
                              + "\n  ".join(map(str, problems)))

    reader = CheckpointReader(src)
    cfg = reader.config
    if (to == "bf16") != cfg.is_fp8:
        reader.close()
        raise CheckpointError(f"{src / CONFIG_NAME}: checkpoint is already {to}")
    if to == "bf16":
        block = cfg.block_size
        new_cfg = cfg.replace(quantization_config=None)
    else:
        new_cfg = cfg.replace(quantization_config=preset("deepseek_v3").quantization_config)
        block = new_cfg.block_size
    dst_table = expected_tensors(new_cfg, mtp=True)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        # headers give each source shard's tensors in their stored order
        shards = reader.shards()
        src_specs = {}
        for shard in shards:
            h = read_header(src / shard)
            entries = sorted(h.entries.values(), key=lambda e: e.start)
            src_specs[shard] = [TensorSpec(e.name, e.shape, e.dtype) for e in entries]
        total_in = sum(s.nbytes for v in src_specs.values() for s in v)

        from tqdm import tqdm

        show = len(shards) > 1 if progress is None else progress
        weight_map: dict[str, str] = {}
        digests: dict[str, str] = {}
        total = 0
        with tqdm(total=total_in, unit="B", unit_scale=True, desc=f"convert to {to}",
                  disable=not show) as bar:
            for shard in shards:
                specs = _plan(src_specs[shard], to, dst_table)
                h = hashlib.sha256()
                total += write_shard(tmp / shard, specs, _produce(reader, specs, to, block),
                                     hasher=h)
                digests[shard] = h.hexdigest()
                reader._close_shard(shard)
                weight_map.update({s.name: shard for s in specs})
                bar.update(sum(s.nbytes for s in src_specs[shard]))
        reader.close()

        _write_side_files(src, tmp, new_cfg, weight_map, total, digests)
        problems = validate(tmp)
        if problems:
            raise CheckpointError("converted checkpoint failed validation:\n  "
                                  + "\n  ".join(map(str, problems)))
        if dst.exists():
            _check_dst(dst, force)  # re-check: something may have appeared meanwhile
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_side_files(src: Path, tmp: Path, new_cfg, weight_map: dict[str, str], total: int,
                      digests: dict[str, str]) -> None:
    """config.json, the index, the source's other files copied, and SHA256SUMS of them all
    (digests: the shards', hashed as they were written)."""
    write_json(tmp / CONFIG_NAME, new_cfg.to_json_dict())
    write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (CONFIG_NAME, INDEX_NAME,
                                                                          MANIFEST):
            shutil.copy2(p, tmp / p.name)
    for p in tmp.iterdir():
        if p.name not in digests:
            digests[p.name] = sha256_file(p)
    write_manifest(tmp, digests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds3dist.checkpoint.convert",
                                 description="Convert a checkpoint between FP8 and bf16.")
    ap.add_argument("--to", choices=("bf16", "fp8"), required=True)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = convert(a.src, a.dst, to=a.to, force=a.force,
                      progress=False if a.no_progress else None)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


make_module_callable(__name__, convert)

if __name__ == "__main__":
    sys.exit(main())
