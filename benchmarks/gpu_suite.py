"""The GPU suite: every GPU kernel against its torch reference and its roofline, the `small`
model on one GPU, and the `-m gpu` tests. Sized to run in under 5 minutes on one H200.

    python benchmarks/gpu_suite.py [--json OUT] [--skip-tests] [--dry-run]

Needs CUDA torch, Triton, safetensors and tokenizers; not Ray, Hydra or DeepSpeed (the offload
test skips without it). Multi-rank NCCL paths (all-to-all, the stage hand-off) need several
GPUs and are not run here. Prints one table, then the same figures as JSON (and into --json).
`--dry-run` (any machine, under a minute) imports every step's code, builds its shapes and
prints what it would run.

Peaks (dense, per GPU): H100 SXM and H200 989 TFLOP/s bf16, 1979 FP8; HBM 3.35 TB/s (H100
SXM), 2.0 (H100 PCIe), 4.8 (H200).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAKS = {  # name fragment -> (bf16 TFLOP/s, fp8 TFLOP/s, HBM TB/s)
    "H200": (989.0, 1979.0, 4.8),
    "H100 PCIe": (756.0, 1513.0, 2.0),
    "H100": (989.0, 1979.0, 3.35),
}
# DeepSeek-V3's shapes (out N, in K) of the FP8 linears, by name
FP8_SHAPES = {"q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
              "dense_gate_up": (36864, 7168), "dense_down": (7168, 18432)}
FP8_M = (1, 64, 1024, 4096)
MLA = dict(heads=128, r=512, p=64, page=64, ctx=4096, batches=(1, 8, 64))
MOE = dict(d=7168, i=2048, experts=32, k=8, n_experts=256, tokens=(1, 8, 64, 512))
SAMPLE = dict(rows=64, vocab=129280)
DECODE_BATCHES = (1, 8, 64)
CTX = 512  # decode context of the model runs


@dataclass
class Row:
    section: str
    name: str
    error: float | None = None  # max |got - ref| / max |ref| (ids: share differing)
    ms: float | None = None
    figure: float | None = None  # TFLOP/s or GB/s
    unit: str = ""
    share: float | None = None  # of the GPU's peak
    note: str = ""
    extra: dict = field(default_factory=dict)


def peaks() -> tuple[float, float, float] | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAKS.items() if k in name), None)


def timed(fn, reps: int = 20) -> float:
    """Median ms of fn() on the GPU (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


# ---- kernels ---------------------------------------------------------------------------
def fp8_gemm_rows(dry: bool) -> list[Row]:
    from ds3dist.checkpoint import fp8

    rows = []
    for name, (n, k) in FP8_SHAPES.items():
        for m in FP8_M:
            if dry:
                rows.append(Row("fp8 gemm", f"{name} {m}x{n}x{k}"))
                continue
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            w, s = fp8.weight_quant(torch.randn(n, k, device="cuda", generator=g) / 16)
            got = fp8.fp8_linear(x, w, s)
            ref = fp8.fp8_linear_emulated(x, w, s, out_dtype=torch.float32)
            ms = timed(lambda: fp8.fp8_linear(x, w, s))
            tflops = 2 * m * n * k / ms / 1e9
            pk = peaks()
            rows.append(Row("fp8 gemm", f"{name} {m}x{n}x{k}", rel_err(got, ref), ms, tflops,
                            "TFLOP/s", tflops / pk[1] if pk else None, fp8.cuda_impl()))
    return rows


def mla_rows(dry: bool) -> list[Row]:
    from ds3dist.kernels.mla_decode import mla_decode, mla_decode_ref

    h, r, p, page, ctx = MLA["heads"], MLA["r"], MLA["p"], MLA["page"], MLA["ctx"]
    rows = []
    for b in MLA["batches"]:
        name = f"b{b} ctx{ctx} {h}h {r}+{p}"
        if dry:
            rows.append(Row("mla decode", name))
            continue
        per = ctx // page
        g = torch.Generator(device="cuda").manual_seed(0)
        pool = torch.randn(b * per, page, r + p, device="cuda", generator=g).bfloat16()
        q = torch.randn(b, h, r + p, device="cuda", generator=g).bfloat16()
        ids = torch.randperm(b * per, device="cuda", generator=g).int()
        kv_len = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        start = torch.arange(0, b * per, per, dtype=torch.int32, device="cuda")
        scale = (128 + 64) ** -0.5
        got = mla_decode(q, kv_len, start, ids, pool, r, scale)
        ref = mla_decode_ref(q, kv_len, start, ids, pool, r, scale)
        ms = timed(lambda: mla_decode(q, kv_len, start, ids, pool, r, scale))
        gbs = (pool.numel() * 2 + q.numel() * 2 + b * h * r * 2) / ms / 1e6
        pk = peaks()
        rows.append(Row("mla decode", name, rel_err(got, ref), ms, gbs, "GB/s",
                        gbs / (pk[2] * 1000) if pk else None))
    return rows


def moe_rows(dry: bool) -> list[Row]:
    from ds3dist.checkpoint.fp8 import weight_quant
    from ds3dist.kernels.moe import fused_experts, fused_experts_ref

    d, i, e, k, n_all = MOE["d"], MOE["i"], MOE["experts"], MOE["k"], MOE["n_experts"]
    rows = []
    for kind in ("bf16", "fp8"):
        if dry:
            rows += [Row("grouped experts", f"{kind} T{t} E{e} {d}x{i}") for t in MOE["tokens"]]
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        ws = [torch.randn(e, *shape, device="cuda", generator=g) / 32
              for shape in ((i, d), (i, d), (d, i))]
        if kind == "fp8":
            qs = [[weight_quant(w[j]) for j in range(e)] for w in ws]
            weights = [torch.stack([q for q, _ in group]) for group in qs]
            scales = [torch.stack([s for _, s in group]) for group in qs]
        else:
            weights, scales = [w.bfloat16() for w in ws], [None] * 3
        for t in MOE["tokens"]:
            x = torch.randn(t, d, device="cuda", generator=g).bfloat16()
            glob = torch.stack([torch.randperm(n_all, device="cuda", generator=g)[:k]
                                for _ in range(t)])
            idx = torch.where(glob < e, glob, -1)  # this rank holds experts 0..e-1
            w_tk = torch.rand(t, k, device="cuda", generator=g)
            args = (x, idx, w_tk, *weights, *scales)
            got, ref = fused_experts(*args), fused_experts_ref(*args)
            ms = timed(lambda: fused_experts(*args))
            hit = int(torch.unique(idx[idx >= 0]).numel())
            nbytes = hit * 3 * d * i * (1 if kind == "fp8" else 2)
            gbs = nbytes / ms / 1e6
            pk = peaks()
            rows.append(Row("grouped experts", f"{kind} T{t} E{e} {d}x{i}", rel_err(got, ref),
                            ms, gbs, "GB/s (weights)", gbs / (pk[2] * 1000) if pk else None,
                            f"{hit} experts hit"))
    return rows


def sampling_rows(dry: bool) -> list[Row]:
    from ds3dist.core.params import SamplingParams
    from ds3dist.kernels.sampling import sample_device, sample_ref

    n, v = SAMPLE["rows"], SAMPLE["vocab"]
    name = f"{n} rows x {v}"
    if dry:
        return [Row("sampling", name)]
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, v, device="cuda", generator=g) * 3
    kinds = [SamplingParams(), SamplingParams(0.7), SamplingParams(0.7, top_k=50),
             SamplingParams(0.8, top_p=0.9)]
    params = [kinds[j % len(kinds)] for j in range(n)]
    keys = list(range(1000, 1000 + n))
    got, ref = sample_device(logits, params, keys), sample_ref(logits, params, keys)
    ms = timed(lambda: sample_device(logits, params, keys))
    return [Row("sampling", name, sum(a != b for a, b in zip(got, ref)) / n, ms,
                note="error: share of ids differing from the reference")]


# ---- the small model ------------------------------------------------------------------
def weight_bytes(model) -> int:
    skip = {id(model.embed_tokens.weight)} if model.embed_tokens is not None else set()
    return sum(t.numel() * t.element_size() for t in model.buffers() if id(t) not in skip)


def model_rows(ckpt: Path | None, dry: bool) -> list[Row]:
    from ds3dist.model.load import load_model
    from ds3dist.rank.graphs import DecodeGraphs

    rows = []
    if dry:
        from ds3dist.config import preset

        cfg = preset("small")
        for execution in ("bf16", "fp8"):
            rows.append(Row("small", f"{execution} logits vs CPU float32",
                            note=f"{cfg.num_hidden_layers} layers"))
            rows += [Row("small", f"{execution} decode b{b} ctx{CTX}") for b in DECODE_BATCHES]
            rows.append(Row("small", f"{execution} prefill 8x{CTX}"))
        return rows
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 129280, (2, 64), generator=g)
    cpu = load_model(ckpt, execution="bf16", dtype=torch.float32, mtp=False)
    want = cpu(prompt)
    del cpu
    for execution in ("bf16", "fp8"):
        model = load_model(ckpt, execution=execution, dtype=torch.bfloat16, device="cuda",
                           mtp=False)
        got = model(prompt.cuda())
        agree = float((got.argmax(-1).cpu() == want.argmax(-1)).float().mean())
        rows.append(Row("small", f"{execution} logits vs CPU float32",
                        rel_err(got.cpu(), want), note=f"argmax agrees {agree:.3f}"))
        for b in DECODE_BATCHES:
            rows.append(_decode_row(model, execution, b, DecodeGraphs))
        rows.append(_prefill_row(model, execution))
        del model
        torch.cuda.empty_cache()
    return rows


def _decode_row(model, execution: str, b: int, graphs_cls) -> Row:
    page = 64
    per = -(-(CTX + 64) // page)
    tables = [list(range(j * per, (j + 1) * per)) for j in range(b)]
    cache = model.new_cache(b * per, page, scratch=True)
    graphs = graphs_cls(model, cache, capture=True)
    toks = torch.randint(0, 129280, (b * CTX,), device="cuda")
    with torch.inference_mode():
        tb = model.token_batch([0] * b, [CTX] * b, tables, page)
        h = model.forward_layers(model.embed(toks), tb, cache)
        nxt = model.logits(h[tb.last_rows]).argmax(-1)
        pos = [CTX]

        def step():
            tb = model.token_batch([pos[0]] * b, [1] * b, tables, page)
            logits = model.logits(graphs.run(model.embed(nxt), tb))
            pos[0] += 1
            return logits

        ms = timed(step, reps=30)
    kv = len(model.layer_ids) * b * (CTX + 33) * model.cache_width * 2
    bound_ms = (weight_bytes(model) + kv) / (peaks()[2] * 1e9) if peaks() else None
    return Row("small", f"{execution} decode b{b} ctx{CTX}", None, ms,
               b / ms * 1000, "tok/s", None,
               f"HBM bound {bound_ms:.3f} ms, {ms / bound_ms:.1f}x" if bound_ms else "",
               {"bound_ms": bound_ms, "graph_replays": graphs.replays})


def _prefill_row(model, execution: str) -> Row:
    b, page = 8, 64
    per = -(-CTX // page)
    tables = [list(range(j * per, (j + 1) * per)) for j in range(b)]
    cache = model.new_cache(b * per, page)
    toks = torch.randint(0, 129280, (b * CTX,), device="cuda")

    def prefill():
        tb = model.token_batch([0] * b, [CTX] * b, tables, page)
        return model.logits(model.forward_layers(model.embed(toks), tb, cache)[tb.last_rows])

    with torch.inference_mode():
        ms = timed(prefill, reps=5)
    return Row("small", f"{execution} prefill {b}x{CTX}", None, ms, b * CTX / ms * 1000, "tok/s")


def generate_rows(ckpt: Path | None, dry: bool) -> list[Row]:
    import ds3dist
    from ds3dist.tokenizer import load_tokenizer

    if dry:
        return [Row("generate", "small bf16, 16 prompts x 32 tokens")]
    model = ds3dist.load_model(ckpt, dtype=torch.bfloat16, device="cuda", mtp=False)
    tok = load_tokenizer(ckpt)
    prompts = [f"Request {j}: tell me about the number {j * 7}." for j in range(16)]
    t0 = time.perf_counter()
    out = ds3dist.generate(model, tok, prompts, max_new_tokens=32)
    s = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in out)
    return [Row("generate", "small bf16, 16 prompts x 32 tokens", None, s * 1000, n / s,
                "tok/s")]


KERNEL_TESTS = ["tests/test_triton_mla.py", "tests/test_triton_moe.py",
                "tests/test_triton_sampling.py"]  # on CUDA tensors where there is a GPU


def test_rows(dry: bool) -> list[Row]:
    rows = []
    for name, args in (("pytest -m gpu", ["-m", "gpu", "tests"]),
                       ("kernel tests on the GPU", KERNEL_TESTS)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
               *args] + (["--collect-only"] if dry else [])
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                           check=False)
        tail = (p.stdout.strip().splitlines() or [""])[-1]
        failed = p.returncode not in (0, 5)
        rows.append(Row("tests", name, 1.0 if failed else None,
                        note=("FAILED " if failed else "") + tail[:120],
                        extra={"rc": p.returncode, "output": p.stdout[-3000:] if failed else ""}))
    return rows


# ---- driver ------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="import and plan every step without a GPU")
    a = ap.parse_args()
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the suite", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    steps = [fp8_gemm_rows, mla_rows, moe_rows, sampling_rows]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if not dry:
            from ds3dist.checkpoint.synthesize import synthesize

            ckpt = synthesize(Path(tmp) / "small", "small", progress=False)
        for step in steps + [lambda d: model_rows(ckpt, d), lambda d: generate_rows(ckpt, d)]:
            rows += _guarded(step, dry)
    if not a.skip_tests:
        rows += _guarded(test_rows, dry)
    _print(rows, dry)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
           "torch": torch.__version__, "triton": _triton_version(), "dry_run": dry,
           "seconds": round(time.perf_counter() - t0, 1),
           "multi_gpu": "not run: the all-to-all and stage hand-off need several GPUs",
           "rows": [r.__dict__ for r in rows]}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


def _guarded(step, dry: bool) -> list[Row]:
    try:
        return step(dry)
    except Exception as e:  # one failing step must not hide the others' figures
        name = getattr(step, "__name__", "step")
        return [Row("error", name, note=f"FAILED {type(e).__name__}: {e}"[:300])]


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def _print(rows: list[Row], dry: bool) -> None:
    head = f"{'section':<16} {'case':<34} {'error':>9} {'ms':>9} {'figure':>10} {'unit':<14} {'peak':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v, fmt, width):
            return format(v, fmt) if v is not None else "-".rjust(width)
        print(f"{r.section:<16} {r.name:<34} {f(r.error, '9.2e', 9)} {f(r.ms, '9.3f', 9)} "
              f"{f(r.figure, '10.1f', 10)} {r.unit:<14} {f(r.share, '6.1%', 6)}  {r.note}")
    if dry:
        print(f"dry run: {len(rows)} steps planned; nothing timed")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
