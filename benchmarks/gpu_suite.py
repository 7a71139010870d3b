"""The GPU suite: every GPU kernel against its torch reference and its roofline, the `small`
model on one GPU, and the `-m gpu` tests. Sized to run in under 5 minutes on one H200.

    python benchmarks/gpu_suite.py [--json OUT] [--skip-tests] [--dry-run]

Needs CUDA torch, Triton, safetensors and tokenizers; not Ray, Hydra or DeepSpeed (the offload
test skips without it). Multi-rank NCCL paths (all-to-all, the stage hand-off) need several
GPUs and are not run here. Prints one table, then the same figures as JSON (and into --json).
`--dry-run` (any machine, under a minute) runs every step once on the CPU at cut-down shapes
(the `tiny` model, the kernels under Triton's interpreter), untimed: so a GPU slot is not
spent on a step that cannot start.

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


@dataclass(frozen=True)
class Shapes:
    """What the suite runs: the release's shapes on a GPU; cut down for the dry run, which
    runs every step once on the CPU (the kernels under Triton's interpreter), untimed."""
    fp8: dict  # name -> (out N, in K) of DeepSeek-V3's FP8 linears
    fp8_m: tuple
    mla: dict
    moe: dict
    sample: dict
    preset: str  # the model of the model steps
    decode_batches: tuple
    ctx: int  # decode context of the model steps
    prefill: tuple  # (sequences, tokens each)


GPU = Shapes(
    fp8={"q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
         "dense_gate_up": (36864, 7168), "dense_down": (7168, 18432)},
    fp8_m=(1, 64, 1024, 4096),
    mla={"heads": 128, "r": 512, "p": 64, "page": 64, "ctx": 4096, "batches": (1, 8, 64)},
    moe={"d": 7168, "i": 2048, "experts": 32, "k": 8, "n_experts": 256,
         "tokens": (1, 8, 64, 512)},
    sample={"rows": 64, "vocab": 129280},
    preset="small", decode_batches=(1, 8, 64), ctx=512, prefill=(8, 512))
DRY = Shapes(
    fp8={"q_b/16": (1536, 96), "ragged": (200, 300)}, fp8_m=(1, 33),
    mla={"heads": 16, "r": 128, "p": 32, "page": 16, "ctx": 40, "batches": (1, 3)},
    moe={"d": 192, "i": 160, "experts": 4, "k": 4, "n_experts": 16, "tokens": (1, 5)},
    sample={"rows": 4, "vocab": 3000},
    preset="tiny", decode_batches=(3,), ctx=24, prefill=(2, 24))


@dataclass
class Run:
    shapes: Shapes
    device: str

    @property
    def dry(self) -> bool:
        return self.device != "cuda"

    def gen(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(0)


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


def share(value: float | None, which: int, scale: float = 1.0) -> float | None:
    pk = peaks()
    return value / (pk[which] * scale) if pk and value is not None else None


def timed(run: Run, fn, reps: int = 20) -> float | None:
    """Median ms of fn() on the GPU (after 3 warm-up calls); the dry run calls it once."""
    if run.dry:
        fn()
        return None
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


def per_s(amount: float, ms: float | None) -> float | None:
    return amount / ms * 1000 if ms else None


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


# ---- kernels ---------------------------------------------------------------------------
def fp8_gemm_rows(run: Run) -> list[Row]:
    from ds3dist.checkpoint import fp8

    def gemm(x, w, s):  # on the CPU the Triton kernel itself (fp8_linear would emulate)
        if not run.dry:
            return fp8.fp8_linear(x, w, s)
        return fp8.triton_fp8_gemm(*fp8.act_quant(x), w, s, x.dtype)

    rows = []
    for name, (n, k) in run.shapes.fp8.items():
        for m in run.shapes.fp8_m:
            g = run.gen()
            x = torch.randn(m, k, device=run.device, generator=g).bfloat16()
            w, s = fp8.weight_quant(torch.randn(n, k, device=run.device, generator=g) / 16)
            got = gemm(x, w, s)
            ref = fp8.fp8_linear_emulated(x, w, s, out_dtype=torch.float32)
            ms = timed(run, lambda: gemm(x, w, s))
            tflops = per_s(2 * m * n * k / 1e12, ms)
            rows.append(Row("fp8 gemm", f"{name} {m}x{n}x{k}", rel_err(got, ref), ms, tflops,
                            "TFLOP/s", share(tflops, 1),
                            fp8.cuda_impl() if not run.dry else "triton"))
    return rows


def mla_rows(run: Run) -> list[Row]:
    from ds3dist.kernels.mla_decode import mla_decode, mla_decode_ref

    c = run.shapes.mla
    h, r, p, page, ctx = c["heads"], c["r"], c["p"], c["page"], c["ctx"]
    rows = []
    for b in c["batches"]:
        per = -(-ctx // page)
        g, dev = run.gen(), run.device
        pool = torch.randn(b * per, page, r + p, device=dev, generator=g).bfloat16()
        q = torch.randn(b, h, r + p, device=dev, generator=g).bfloat16()
        ids = torch.randperm(b * per, device=dev, generator=g).int()
        kv_len = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        start = torch.arange(0, b * per, per, dtype=torch.int32, device=dev)
        scale = (128 + 64) ** -0.5
        got = mla_decode(q, kv_len, start, ids, pool, r, scale)
        ref = mla_decode_ref(q, kv_len, start, ids, pool, r, scale)
        ms = timed(run, lambda: mla_decode(q, kv_len, start, ids, pool, r, scale))
        gbs = per_s((b * ctx * (r + p) + q.numel() + b * h * r) * 2 / 1e9, ms)
        rows.append(Row("mla decode", f"b{b} ctx{ctx} {h}h {r}+{p}", rel_err(got, ref), ms,
                        gbs, "GB/s", share(gbs, 2, 1000)))
    return rows


def moe_rows(run: Run) -> list[Row]:
    from ds3dist.checkpoint.fp8 import weight_quant
    from ds3dist.kernels.moe import fused_experts, fused_experts_ref

    c = run.shapes.moe
    d, i, e, k, n_all = c["d"], c["i"], c["experts"], c["k"], c["n_experts"]
    rows = []
    for kind in ("bf16", "fp8"):
        g, dev = run.gen(), run.device
        ws = [torch.randn(e, *shape, device=dev, generator=g) / 32
              for shape in ((i, d), (i, d), (d, i))]
        if kind == "fp8":
            qs = [[weight_quant(w[j]) for j in range(e)] for w in ws]
            weights = [torch.stack([q for q, _ in group]) for group in qs]
            scales = [torch.stack([s for _, s in group]) for group in qs]
        else:
            weights, scales = [w.bfloat16() for w in ws], [None] * 3
        for t in c["tokens"]:
            x = torch.randn(t, d, device=dev, generator=g).bfloat16()
            glob = torch.stack([torch.randperm(n_all, device=dev, generator=g)[:k]
                                for _ in range(t)])
            idx = torch.where(glob < e, glob, -1)  # this rank holds experts 0..e-1
            w_tk = torch.rand(t, k, device=dev, generator=g)
            args = (x, idx, w_tk, *weights, *scales)
            got, ref = fused_experts(*args), fused_experts_ref(*args)
            ms = timed(run, lambda: fused_experts(*args))
            hit = int(torch.unique(idx[idx >= 0]).numel())
            gbs = per_s(hit * 3 * d * i * (1 if kind == "fp8" else 2) / 1e9, ms)
            rows.append(Row("grouped experts", f"{kind} T{t} E{e} {d}x{i}", rel_err(got, ref),
                            ms, gbs, "GB/s (weights)", share(gbs, 2, 1000),
                            f"{hit} experts hit"))
    return rows


def sampling_rows(run: Run) -> list[Row]:
    from ds3dist.core.params import SamplingParams
    from ds3dist.kernels.sampling import sample_device, sample_ref

    n, v = run.shapes.sample["rows"], run.shapes.sample["vocab"]
    logits = torch.randn(n, v, device=run.device, generator=run.gen()) * 3
    kinds = [SamplingParams(), SamplingParams(0.7), SamplingParams(0.7, top_k=50),
             SamplingParams(0.8, top_p=0.9)]
    params = [kinds[j % len(kinds)] for j in range(n)]
    keys = list(range(1000, 1000 + n))
    got, ref = sample_device(logits, params, keys), sample_ref(logits, params, keys)
    ms = timed(run, lambda: sample_device(logits, params, keys))
    return [Row("sampling", f"{n} rows x {v}", sum(a != b for a, b in zip(got, ref)) / n, ms,
                note="error: share of ids differing from the reference")]


# ---- the model on one GPU -------------------------------------------------------------
def weight_bytes(model) -> int:
    skip = {id(model.embed_tokens.weight)} if model.embed_tokens is not None else set()
    return sum(t.numel() * t.element_size() for t in model.buffers() if id(t) not in skip)


def model_rows(run: Run, ckpt: Path) -> list[Row]:
    from ds3dist.model.load import load_model

    rows, sh = [], run.shapes
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 129280, (2, 2 * sh.ctx // 8), generator=g)
    cpu = load_model(ckpt, execution="bf16", dtype=torch.float32, mtp=False)
    want = cpu(prompt)
    del cpu
    for execution in ("bf16", "fp8"):
        model = load_model(ckpt, execution=execution, dtype=torch.bfloat16, device=run.device,
                           mtp=False)
        got = model(prompt.to(run.device))
        agree = float((got.argmax(-1).cpu() == want.argmax(-1)).float().mean())
        rows.append(Row(sh.preset, f"{execution} logits vs CPU float32",
                        rel_err(got.cpu(), want), note=f"argmax agrees {agree:.3f}"))
        rows += [_decode_row(run, model, execution, b) for b in sh.decode_batches]
        rows.append(_prefill_row(run, model, execution))
        del model
        if not run.dry:
            torch.cuda.empty_cache()
    return rows


def _tables(b: int, tokens: int, page: int) -> list[list[int]]:
    per = -(-tokens // page)
    return [list(range(j * per, (j + 1) * per)) for j in range(b)]


def _decode_row(run: Run, model, execution: str, b: int) -> Row:
    from ds3dist.rank.graphs import DecodeGraphs

    page, ctx, vocab = 64, run.shapes.ctx, model.cfg.vocab_size
    tables = _tables(b, ctx + 64, page)
    cache = model.new_cache(b * len(tables[0]), page, scratch=True)
    graphs = DecodeGraphs(model, cache, capture=not run.dry)
    toks = torch.randint(0, vocab, (b * ctx,), device=run.device)
    with torch.inference_mode():
        tb = model.token_batch([0] * b, [ctx] * b, tables, page)
        h = model.forward_layers(model.embed(toks), tb, cache)
        nxt = model.logits(h[tb.last_rows]).argmax(-1)
        pos = [ctx]

        def step():
            tb = model.token_batch([pos[0]] * b, [1] * b, tables, page)
            logits = model.logits(graphs.run(model.embed(nxt), tb))
            pos[0] += 1
            return logits

        ms = timed(run, step, reps=30)
    kv = len(model.layer_ids) * b * (ctx + 33) * model.cache_width * 2
    pk = peaks()
    bound_ms = (weight_bytes(model) + kv) / (pk[2] * 1e9) if pk else None
    note = f"HBM bound {bound_ms:.3f} ms, {ms / bound_ms:.1f}x" if bound_ms and ms else ""
    return Row(run.shapes.preset, f"{execution} decode b{b} ctx{ctx}", None, ms,
               per_s(b, ms), "tok/s", None, note,
               {"bound_ms": bound_ms, "graph_replays": graphs.replays})


def _prefill_row(run: Run, model, execution: str) -> Row:
    (b, n), page = run.shapes.prefill, 64
    tables = _tables(b, n, page)
    cache = model.new_cache(b * len(tables[0]), page)
    toks = torch.randint(0, model.cfg.vocab_size, (b * n,), device=run.device)

    def prefill():
        tb = model.token_batch([0] * b, [n] * b, tables, page)
        return model.logits(model.forward_layers(model.embed(toks), tb, cache)[tb.last_rows])

    with torch.inference_mode():
        ms = timed(run, prefill, reps=5)
    return Row(run.shapes.preset, f"{execution} prefill {b}x{n}", None, ms, per_s(b * n, ms),
               "tok/s")


def generate_rows(run: Run, ckpt: Path) -> list[Row]:
    import ds3dist
    from ds3dist.tokenizer import load_tokenizer

    model = ds3dist.load_model(ckpt, dtype=torch.bfloat16, device=run.device, mtp=False)
    tok = load_tokenizer(ckpt)
    count, new = (16, 32) if not run.dry else (2, 3)
    prompts = [f"Request {j}: tell me about the number {j * 7}." for j in range(count)]
    t0 = time.perf_counter()
    out = ds3dist.generate(model, tok, prompts, max_new_tokens=new)
    s = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in out)
    return [Row("generate", f"{run.shapes.preset} bf16, {count} prompts x {new} tokens", None,
                s * 1000, n / s, "tok/s")]


# the files holding `-m gpu` tests (collecting every test module would import Ray, which the
# GPU machine may lack); they need hypothesis and hydra-core (small wheels: carry them)
GPU_TESTS = ["tests/test_fp8.py", "tests/test_offload.py"]
KERNEL_TESTS = ["tests/test_triton_mla.py", "tests/test_triton_moe.py",
                "tests/test_triton_sampling.py"]  # on CUDA tensors where there is a GPU


def test_rows(run: Run) -> list[Row]:
    rows = []
    for name, args in (("pytest -m gpu", ["-m", "gpu", *GPU_TESTS]),
                       ("kernel tests on the GPU", KERNEL_TESTS)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
               *args] + (["--collect-only"] if run.dry else [])
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
                    help="every step once on the CPU at cut-down shapes, untimed")
    a = ap.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the suite", file=sys.stderr)
        return 2
    run = Run(DRY, "cpu") if a.dry_run else Run(GPU, "cuda")
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, _kernels_on(run):
        from ds3dist.checkpoint.synthesize import synthesize

        ckpt = synthesize(Path(tmp) / run.shapes.preset, run.shapes.preset, progress=False)
        steps = [fp8_gemm_rows, mla_rows, moe_rows, sampling_rows,
                 lambda r: model_rows(r, ckpt), lambda r: generate_rows(r, ckpt)]
        names = ["fp8_gemm", "mla", "moe", "sampling", "model", "generate"]
        for name, step in zip(names, steps):
            rows += _guarded(name, step, run)
    if not a.skip_tests:
        rows += _guarded("tests", test_rows, run)
    _print(rows)
    out = {"device": torch.cuda.get_device_name() if not run.dry else "cpu (dry run)",
           "torch": torch.__version__, "triton": _triton_version(), "dry_run": run.dry,
           "seconds": round(time.perf_counter() - t0, 1),
           "multi_gpu": "not run: the all-to-all and stage hand-off need several GPUs",
           "rows": [r.__dict__ for r in rows]}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


def _kernels_on(run: Run):
    """The dry run forces the GPU kernel selection onto CPU tensors (interpreted)."""
    from contextlib import nullcontext

    from ds3dist import kernels

    return kernels.forced() if run.dry else nullcontext()


def _guarded(name: str, step, run: Run) -> list[Row]:
    try:
        return step(run)
    except Exception as e:  # one failing step must not hide the others' figures
        return [Row("error", name, note=f"FAILED {type(e).__name__}: {e}"[:300])]


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def _print(rows: list[Row]) -> None:
    head = f"{'section':<16} {'case':<34} {'error':>9} {'ms':>9} {'figure':>10} {'unit':<14} {'peak':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v, fmt, width):
            return format(v, fmt) if v is not None else "-".rjust(width)
        print(f"{r.section:<16} {r.name:<34} {f(r.error, '9.2e', 9)} {f(r.ms, '9.3f', 9)} "
              f"{f(r.figure, '10.1f', 10)} {r.unit:<14} {f(r.share, '6.1%', 6)}  {r.note}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if "--dry-run" in sys.argv:  # before any kernel is built
        os.environ["TRITON_INTERPRET"] = "1"
    sys.exit(main())
