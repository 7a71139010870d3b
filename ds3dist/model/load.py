"""load_model: build on the meta device, then read exactly the tensors the held parts need.

Tensors are read by name through CheckpointReader one module at a time and assigned in
place of the meta buffers, so peak memory stays near the final size. In execution 'bf16'
FP8 weights are dequantized once here into the compute dtype; in 'fp8' they stay FP8.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ds3dist.checkpoint.fp8 import weight_dequant
from ds3dist.checkpoint.layout import SCALE_SUFFIX
from ds3dist.checkpoint.reader import CheckpointError
from ds3dist.model import cpu_kernel
from ds3dist.model.experts import Experts
from ds3dist.model.linear import Linear, choose_paths
from ds3dist.model.mla import MLA
from ds3dist.model.mlp import MLP
from ds3dist.model.options import DEFAULT_ATTN_FORM, BuildOptions, default_dtype
from ds3dist.model.transformer import Transformer, checkpoint_name


def load_model(checkpoint_dir, execution: str = "bf16", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", layers: Iterable[int] | None = None,
               experts: Iterable[int] | Mapping[int, Iterable[int]] | None = None,
               mtp: bool = True, embed: bool | None = None,
               head: bool | None = None, attn_form: str = DEFAULT_ATTN_FORM,
               host: Callable[[str], bool] | None = None) -> Transformer:
    """Load (part of) a checkpoint as a Transformer.

    execution: 'bf16' (weights dequantized into `dtype`, default `default_dtype(device)`) or
    'fp8' (FP8 weights with block scales, activations quantized per token; needs an FP8
    checkpoint).
    layers: layer ids to hold (None = all); experts: routed expert ids held in every MoE
    layer (None = all), or a mapping MoE layer id -> its expert ids (a placement); embed/head default to whether layer 0 / the last layer is held; mtp
    loads the MTP layer when the last layer is held and the checkpoint has it.
    attn_form: 'auto' (per sequence and step, the MLA form with fewer multiplies), 'absorbed'
    or 'naive' (ds3dist.model.mla).
    `checkpoint_dir` may also be an open CheckpointReader.
    host: module names whose tensors are loaded into host memory whatever `device` is (what
    a rank offloads; see runtime.offload).
    model.load_stats = {"bytes_read", "seconds"}.
    """
    from ds3dist.checkpoint.reader import CheckpointReader

    t0 = time.perf_counter()
    own = not hasattr(checkpoint_dir, "get")
    reader = CheckpointReader(Path(checkpoint_dir)) if own else checkpoint_dir
    try:
        cfg = reader.config
        if execution == "fp8" and not cfg.is_fp8:
            raise ValueError(f"execution='fp8' needs an FP8 checkpoint (weights with _scale_inv "
                             f"block scales); {getattr(reader, 'path', checkpoint_dir)} is a bf16 "
                             f"checkpoint: use execution='bf16'")
        dtype = dtype or default_dtype(device)
        per_layer = isinstance(experts, Mapping)
        expert_ids = None if experts is None or per_layer else _expert_ids(experts, cfg)
        layer_experts = tuple(sorted((int(i), _expert_ids(ids, cfg))
                                     for i, ids in experts.items())) if per_layer else None
        held = None if layers is None else sorted({int(i) for i in layers})
        last_held = held is None or cfg.num_hidden_layers - 1 in held
        mtp_ids = cfg.mtp_layer_ids
        with_mtp = bool(mtp and last_held and mtp_ids
                        and reader.has(f"model.layers.{mtp_ids[0]}.eh_proj.weight"))
        opts = BuildOptions(cfg, execution, dtype, expert_ids, attn_form, layer_experts)
        with torch.device("meta"):
            model = Transformer(opts, held, embed=embed, head=head, mtp=with_mtp)
        start = reader.bytes_read
        _fill(model, reader, torch.device(device), dtype, host)
        model.load_stats = {"bytes_read": reader.bytes_read - start,
                            "seconds": time.perf_counter() - t0}
    finally:
        if own:
            reader.close()
    return model


def _expert_ids(experts: Iterable[int], cfg) -> tuple[int, ...]:
    ids = tuple(sorted({int(e) for e in experts}))
    if not all(0 <= e < cfg.n_routed_experts for e in ids):
        raise ValueError(f"expert ids must be in 0..{cfg.n_routed_experts - 1}, got {list(ids)}")
    return ids


def _fill(model: Transformer, reader, device: torch.device, dtype: torch.dtype,
          host: Callable[[str], bool] | None = None) -> None:
    """Replace every meta buffer by the checkpoint tensor of the same name."""
    _fill_module(model, "", reader, device, dtype, host)
    _prepare(model, dtype, device)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:
        raise RuntimeError(f"tensors not loaded: {left[:5]}")


def swap_experts(model: Transformer, layer_id: int, experts: Iterable[int], reader=None,
                 given: dict[int, dict[str, torch.Tensor]] | None = None) -> int:
    """Make MoE layer layer_id hold exactly `experts` (a new placement): experts it keeps stay
    as they are; each new one takes its tensors from `given` (expert id -> {name in the
    expert's module: tensor}, as expert_tensors gives them, e.g. received from another rank),
    else from the checkpoint (reader). Returns how many were read from the checkpoint."""
    moe = model.moe_layers()[layer_id]
    name = next(n for n, m in model.named_modules() if m is moe) + ".experts"
    old, ids, given = moe.experts, _expert_ids(experts, model.cfg), given or {}
    opts = replace(model.opts, expert_ids=ids, layer_experts=None)
    with torch.device("meta"):
        new = Experts(opts, layer_id)
    device, dtype = model.device, model.dtype
    read = 0
    for e in ids:
        if str(e) in old:
            new[str(e)] = old[str(e)]
        elif e in given:
            for key, t in given[e].items():
                mod_name, buf = key.rsplit(".", 1)
                new[str(e)].get_submodule(mod_name)._buffers[buf] = t
        else:
            _fill_module(new[str(e)], f"{name}.{e}.", reader, device, dtype)
            read += 1
    for mlp in new.values():
        mlp.fuse()
    if device.type == "cpu":
        new.stack()
        pack_weights(new)
    moe.experts = new
    return read


def expert_tensors(model: Transformer, layer_id: int, expert: int) -> dict[str, torch.Tensor]:
    """A held expert's tensors by name in its module (gate_proj.weight, ..., with the FP8
    scales), in a fixed order: what swap_experts takes as `given`."""
    mlp = model.moe_layers()[layer_id].experts[str(expert)]
    return {f"{lin}.{buf}": t for lin in ("gate_proj", "up_proj", "down_proj")
            for buf, t in mlp.get_submodule(lin)._buffers.items() if t is not None}


def _fill_module(root: nn.Module, root_prefix: str, reader, device: torch.device,
                 dtype: torch.dtype, host: Callable[[str], bool] | None = None) -> None:
    cpu = torch.device("cpu")
    for sub_name, mod in root.named_modules():
        mod_name = root_prefix + sub_name if sub_name else root_prefix.rstrip(".")
        prefix = f"{mod_name}." if mod_name else ""
        dev = cpu if host is not None and host(mod_name) else device
        if isinstance(mod, Linear):
            _fill_linear(mod, checkpoint_name(prefix + "weight"), reader, dev, dtype)
            continue
        for buf_name, buf in list(mod._buffers.items()):
            if buf is None or buf_name not in mod._buffers or buf_name in mod._non_persistent_buffers_set:
                continue
            name = checkpoint_name(prefix + buf_name)
            t = reader.get(name)
            _check_shape(name, t, buf.shape)
            mod._buffers[buf_name] = t.to(device=dev, dtype=buf.dtype)


def _prepare(model: Transformer, dtype: torch.dtype, device: torch.device) -> None:
    """The compute forms of the loaded weights: kv_b dequantized once for the absorbed form,
    fused MLPs, and on a CPU stacked bf16 experts (the grouped kernel) and oneDNN-packed
    copies."""
    for mod in model.modules():
        if isinstance(mod, MLA) and mod.form != "naive" and mod.kv_b_proj.is_fp8:
            mod.wkv_b(dtype)  # dequantize kv_b once for the absorbed form
        if isinstance(mod, MLP):
            mod.fuse()
    if device.type != "cpu":
        return
    cpu_kernel.kernel()  # built (once per machine) now, not in a rank's first step
    for mod in model.modules():
        if isinstance(mod, Experts):
            mod.stack()  # the grouped kernel's operands (before packing: the weights move)
    pack_weights(model)


def pack_weights(root: nn.Module) -> None:
    """oneDNN-packed copies of the plain CPU weights under `root` that a forward reads: fused
    MLPs whole, the other Linears (attention, the head) one by one; then matmul's paths for
    each bf16 weight shape, timed once (linear.choose_paths)."""
    unpacked: set[int] = set()  # Linears whose forward is never called
    for mod in root.modules():
        if isinstance(mod, MLA) and mod.form != "naive":
            unpacked.add(id(mod.kv_b_proj))  # read through wkv_b
    for mod in root.modules():
        if isinstance(mod, MLP) and mod.gate_up is not None:  # fused: not its Linears
            mod.pack()
            unpacked.update(id(lin) for lin in (mod.gate_proj, mod.up_proj, mod.down_proj))
    for mod in root.modules():
        if isinstance(mod, Linear) and id(mod) not in unpacked:
            mod.pack()
            choose_paths(mod.weight, mod.packed)
        elif isinstance(mod, MLP) and mod.gate_up is not None:
            packed_gu, packed_down = mod.packed or (None, None)
            choose_paths(mod.gate_up, packed_gu)
            choose_paths(mod.down_proj.weight, packed_down)


def unpack_weights(root: nn.Module) -> None:
    """Drop the packed copies under `root` (pack_weights makes them again)."""
    for mod in root.modules():
        if isinstance(mod, (Linear, MLP)):
            mod.packed = None


def _fill_linear(lin: Linear, name: str, reader, device: torch.device, dtype: torch.dtype) -> None:
    w = reader.get(name)
    _check_shape(name, w, lin.weight.shape)
    scale_name = name + SCALE_SUFFIX
    scale = reader.get(scale_name) if reader.has(scale_name) else None
    if scale is not None:
        _check_scale(scale_name, scale, reader)
    if lin.is_fp8:  # fp8 execution: keep FP8 + scales
        if scale is None:
            raise ValueError(f"{name}: fp8 execution needs {scale_name}, which the checkpoint lacks")
        _check_shape(scale_name, scale, lin.weight_scale_inv.shape)
        lin._buffers["weight"] = w.to(device)
        lin._buffers["weight_scale_inv"] = scale.to(device=device, dtype=torch.float32)
    elif scale is not None:  # FP8 checkpoint, plain execution: dequantize once
        lin._buffers["weight"] = weight_dequant(w.to(device), scale.to(device), lin.block, dtype)
    else:
        lin._buffers["weight"] = w.to(device=device, dtype=dtype)


def _check_scale(name: str, scale: torch.Tensor, reader) -> None:
    """A block scale must be finite and > 0 (a corrupt one silently scales a block to garbage)."""
    bad = int((~(torch.isfinite(scale) & (scale > 0))).sum())
    if bad:
        where = reader.shard_of(name) if hasattr(reader, "shard_of") else "<in-memory tensors>"
        raise CheckpointError(f"{where}: tensor {name!r}: {bad} of {scale.numel()} scale values "
                              f"are non-finite or <= 0")


def _check_shape(name: str, t: torch.Tensor, want) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name}: checkpoint shape {list(t.shape)}, model expects {list(want)}")


def build_model(opts: BuildOptions, tensors: dict[str, torch.Tensor], layers=None, embed=None,
                head=None, mtp=None, device: str | torch.device = "cpu") -> Transformer:
    """A Transformer from an in-memory {checkpoint name: tensor} dict (tests, tools)."""

    class _DictReader:
        bytes_read = 0

        def get(self, name):
            return tensors[name]

        def has(self, name):
            return name in tensors

    with torch.device("meta"):
        model = Transformer(opts, layers, embed=embed, head=head, mtp=mtp)
    _fill(model, _DictReader(), torch.device(device), opts.dtype)
    return model


__all__ = ["load_model", "build_model", "pack_weights", "unpack_weights", "swap_experts",
           "expert_tensors"]
