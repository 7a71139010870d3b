"""Single-process model throughput on CPU: prefill and decode tokens/s per execution mode.

    python benchmarks/bench_model.py [--presets tiny,small] [--executions bf16,fp8]
                                     [--batch 8] [--prompt-len 128] [--new-tokens 32]
                                     [--threads 2] [--checkpoint DIR]

Synthesizes an FP8 checkpoint per preset (unless --checkpoint is given), loads it in each
execution mode and times, on the flat token batch and paged cache the engine uses: prefill of
batch x prompt-len tokens (logits of the last positions only), then new-tokens greedy decode
steps of the whole batch.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ds3dist.model.options import ATTN_FORMS, DEFAULT_ATTN_FORM
from ds3dist.runtime.hostmem import retain_freed_memory


def bench(ckpt: Path, execution: str, batch: int, prompt_len: int, new_tokens: int,
          attn_form: str, dtype: torch.dtype | None = None, page: int = 64) -> dict:
    from ds3dist.model.load import load_model

    model = load_model(ckpt, execution=execution, dtype=dtype, attn_form=attn_form, mtp=False)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.cfg.vocab_size, (batch * prompt_len,), generator=g)
    per_seq = -(-(prompt_len + new_tokens) // page)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]

    def prefill():
        cache = model.new_cache(batch * per_seq, page)
        tb = model.token_batch([0] * batch, [prompt_len] * batch, tables, page)
        h = model.forward_layers(model.embed(toks), tb, cache)
        return cache, model.logits(h[tb.last_rows])

    def decode(cache, logits, steps):
        for i in range(steps):
            nxt = logits.argmax(-1)
            tb = model.token_batch([prompt_len + i] * batch, [1] * batch, tables, page)
            logits = model.logits(model.forward_layers(model.embed(nxt), tb, cache))
        return logits

    with torch.inference_mode():
        cache, logits = prefill()  # warm-up (allocator, kernels)
        decode(cache, logits, 2)
        t0 = time.perf_counter()
        cache, logits = prefill()
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        decode(cache, logits, new_tokens)
        t_decode = time.perf_counter() - t0
    return {
        "load_s": model.load_stats["seconds"],
        "bytes_read": model.load_stats["bytes_read"],
        "prefill_tok_s": batch * prompt_len / t_prefill,
        "decode_tok_s": batch * new_tokens / t_decode,
        "decode_ms_step": 1000 * t_decode / new_tokens,
        "cache_bytes_per_token": cache.nbytes() // (cache.num_pages * page),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--executions", default="bf16,fp8")
    ap.add_argument("--checkpoint", default=None, help="use this FP8 checkpoint (one preset)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="compute dtype (default: the execution's)")
    ap.add_argument("--attn-form", default=DEFAULT_ATTN_FORM, choices=ATTN_FORMS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the engine's ranks and the one-process launch do

    from ds3dist.checkpoint.synthesize import synthesize

    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} decode steps, "
          f"{args.threads} threads, attention {args.attn_form}, torch {torch.__version__}")
    print(f"{'preset':<8}{'exec':<6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}"
          f"{'load s':>8}{'MB read':>9}{'cache B/tok':>12}")
    for preset in args.presets.split(","):
        tmp = None
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="bench-model-"))
            ckpt = synthesize(tmp / preset, preset=preset, seed=0, progress=False)
        try:
            for ex in args.executions.split(","):
                r = bench(ckpt, ex, args.batch, args.prompt_len, args.new_tokens, args.attn_form,
                          getattr(torch, args.dtype) if args.dtype else None)
                print(f"{preset:<8}{ex:<6}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}"
                      f"{r['decode_ms_step']:>9.1f}{r['load_s']:>8.1f}{r['bytes_read'] / 1e6:>9.1f}"
                      f"{r['cache_bytes_per_token']:>12}", flush=True)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
