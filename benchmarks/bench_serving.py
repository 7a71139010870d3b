"""Side-by-side serving benchmark: HF transformers, ds3dist and vLLM's CPU build, one run.

    python benchmarks/bench_serving.py [--preset small] [--ckpt-dir DIR] [--out figures.json]
        [--vllm-python /work/vllm-venv/bin/python] [--skip-hf] [--skip-vllm] [--skip-ds3dist]
        [--quick]

Prints figures, asserts nothing. On one bf16 checkpoint of the preset (synthesized with
random weights, then converted to bf16; both kept under --ckpt-dir and reused by later runs):

1. Fixed batch: 8 prompts x 32 token ids (seeded RNG over the tokenizer's vocabulary:
   the launch refuses ids past it), greedy, EOS ignored. ms per decode step = (time for N new tokens - time for 1) / (N - 1), N = 64,
   for HF `model.generate`, ds3dist `generate` in this process and through the Python API's
   `Engine` (pp1ep1, its default threads), and vLLM `LLM.generate`. Beside them the machine's
   floor: its read bandwidth (a 256 MiB float32 sum on 2 threads), the bytes a decode step
   reads (the planner's figure), and each engine's step as a multiple of bytes / bandwidth.
2. Heterogeneous offline workload: 48 requests, prompt lengths log-uniform in 16..1024,
   max_tokens uniform in 8..128, greedy, seeded RNG. ds3dist runs it as an OpenAI batch file
   through `python -m ds3dist.launch` (a subprocess; completion tok/s from its summary JSON),
   as runtime.control=auto (the default: one Ray actor, pp1ep1) and runtime.control=local
   (one process), alternating --launch-repeats times (the fastest of each reported); HF in static batches of 8 in request order, left-padded, each batch generating its largest
   max_tokens (only each request's own max_tokens count as completion tokens); vLLM in one
   `LLM.generate` call. Reported: completion tok/s and wall seconds.
3. vLLM runs in its own venv (--vllm-python) through benchmarks/_vllm_worker.py; skipped with
   a note when that python is missing or cannot import vLLM.

--quick: a smoke test (16 new tokens in the fixed batch; 8 requests with prompts of 16..128
tokens and max_tokens 8..32). Run it on a quiet machine: a 2-core box is very sensitive to
other load, so every engine is measured back to back in this one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ds3dist.runtime.hostmem import retain_freed_memory

HERE = Path(__file__).resolve().parent
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
VLLM_ENV = {"VLLM_MLA_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}
FIRST_ID = 2  # token ids drawn from [FIRST_ID, id_limit): skips BOS 0 and EOS 1


def default_ckpt_dir() -> Path:
    root = os.environ.get("DS3DIST_CACHE") or Path.home() / ".cache" / "ds3dist"
    return Path(root) / "bench_serving"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="tiny or small (default small)")
    ap.add_argument("--ckpt-dir", type=Path, default=None,
                    help="where the FP8 and bf16 checkpoints are kept (default: cache dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-dtypes", default="bfloat16,float32",
                    help="HF's fixed batch in each of these dtypes (its checkpoint's is bfloat16)")
    ap.add_argument("--hf-workload-dtypes", default="bfloat16",
                    help="HF's mixed workload only in these (it takes long in static batches)")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-ds3dist", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small workload, for a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="fixed batch: each timing is the fastest of this many calls")
    ap.add_argument("--launch-timeout", type=float, default=7200.0)
    ap.add_argument("--launch-repeats", type=int, default=1,
                    help="workload through the launch: runs of each control, alternating "
                         "(the fastest of each is reported)")
    args = ap.parse_args(argv)
    args.ckpt_dir = args.ckpt_dir or default_ckpt_dir()
    return args


# ----------------------------------------------------------------------------- checkpoints

def ensure_checkpoints(preset: str, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(fp8_dir, bf16_dir) under root, synthesized / converted only when missing."""
    fp8 = root / f"{preset}-seed{seed}-fp8"
    bf16 = root / f"{preset}-seed{seed}-bf16"
    root.mkdir(parents=True, exist_ok=True)
    if not (fp8 / "SHA256SUMS").exists():
        _build(fp8, ["ds3dist.checkpoint.synthesize", "--preset", preset, "--seed", str(seed),
                     "--no-progress", "--out"])
    if not (bf16 / "SHA256SUMS").exists():
        _build(bf16, ["ds3dist.checkpoint.convert", "--to", "bf16", "--no-progress", str(fp8)])
    return fp8, bf16


def _build(dst: Path, module_args: list[str]) -> None:
    """Run `python -m <module_args> TMP` and move TMP to dst once it succeeded."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[setup] writing {dst} ...", flush=True)
    subprocess.run([sys.executable, "-m", *module_args, str(tmp)], check=True)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


# ----------------------------------------------------------------------------- workloads

def fixed_prompts(id_limit: int, n: int = 8, length: int = 32, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, id_limit) for _ in range(length)] for _ in range(n)]


def mixed_workload(id_limit: int, n: int, min_len: int, max_len: int, min_new: int, max_new: int,
                   seed: int = 1) -> list[dict]:
    """n requests: prompt length log-uniform in [min_len, max_len], max_tokens uniform."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        length = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
        prompt = [rng.randrange(FIRST_ID, id_limit) for _ in range(length)]
        reqs.append({"prompt": prompt, "max_tokens": rng.randint(min_new, max_new)})
    return reqs


def write_openai_batch(reqs: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for i, r in enumerate(reqs):
            body = {"prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def decode_ms(t_one: float, t_n: float, n: int) -> float:
    """ms per decode step from the time for 1 new token and for n new tokens."""
    return 1000.0 * (t_n - t_one) / (n - 1)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def best_of(repeats: int, fn, *a, **kw):
    """(fastest of `repeats` timed calls, the last call's output): one busy spell on a
    2-core machine can otherwise make the 1-token call slower than the N-token one."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t, out = timed(fn, *a, **kw)
        times.append(t)
    return min(times), out


def fixed_row(t_one: float, t_n: float, n: int, **extra) -> dict:
    ms = decode_ms(t_one, t_n, n)
    if ms <= 0:
        print(f"  warning: {ms:.1f} ms/step (1 token {t_one:.3f} s, {n} tokens {t_n:.3f} s):"
              " the machine was busy; rerun on a quiet one", flush=True)
    return {"ms_per_decode_step": ms, "seconds_1": t_one, "seconds_n": t_n, "new_tokens": n,
            **extra}


class RowFailed(Exception):
    """A benchmark row that could not run: message (one line) and details (printed once)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def failed(row: dict, exc: BaseException) -> dict:
    """Record exc as the row's error and print it (a traceback tail for unexpected errors)."""
    if isinstance(exc, RowFailed):
        details = exc.details
    else:
        details = "\n".join(traceback.format_exc().strip().splitlines()[-6:])
    print(f"  FAILED: {exc}\n    " + details.replace("\n", "\n    "), flush=True)
    row["error"] = str(exc) if isinstance(exc, RowFailed) else f"{type(exc).__name__}: {exc}"
    return row


def tail_of(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def last_error_line(text: str) -> str:
    """The last line that names an error, else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    hits = [ln for ln in lines if "error" in ln.lower()]
    return (hits or lines or ["(no output)"])[-1]


# ----------------------------------------------------------------------------- HF transformers

def hf_load(bf16_dir: Path, dtype: str = "bfloat16"):
    import torch
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP layer's weights are "unexpected": expected
    hf_logging.disable_progress_bar()
    model = DeepseekV3ForCausalLM.from_pretrained(str(bf16_dir), dtype=getattr(torch, dtype))
    return model.eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """Greedy, left-padded, exactly new_tokens tokens per row (EOS suppressed by min_new_tokens)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=pad_id)


def hf_fixed(model, prompts: list[list[int]], new_tokens: int, pad_id: int,
             repeats: int) -> dict:
    hf_generate(model, prompts[:2], 4, pad_id)  # warm-up
    t1, _ = best_of(repeats, hf_generate, model, prompts, 1, pad_id)
    tn, out = best_of(repeats, hf_generate, model, prompts, new_tokens, pad_id)
    return fixed_row(t1, tn, new_tokens, tokens_per_prompt=int(out.shape[1] - len(prompts[0])))


def hf_workload(model, reqs: list[dict], pad_id: int, batch: int = 8) -> dict:
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        hf_generate(model, [r["prompt"] for r in chunk], max(r["max_tokens"] for r in chunk),
                    pad_id)
        tokens += sum(r["max_tokens"] for r in chunk)
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "completion_tokens": tokens,
            "completion_tokens_per_second": tokens / wall}


def run_hf(bf16_dir: Path, prompts, new_tokens, reqs, pad_id: int, repeats: int,
           dtype: str = "bfloat16") -> dict:
    """HF's fixed batch, and its workload when reqs is not None, in `dtype`."""
    import transformers

    print(f"[hf] transformers {transformers.__version__}, {dtype}", flush=True)
    res: dict = {"version": transformers.__version__, "dtype": dtype}
    try:
        model = hf_load(bf16_dir, dtype)
    except Exception as e:  # noqa: BLE001 - a benchmark row fails, the run goes on
        err = failed({}, e)
        return {**res, "fixed": err, "workload": dict(err)}
    try:
        res["fixed"] = hf_fixed(model, prompts, new_tokens, pad_id, repeats)
        print(f"[hf] fixed batch: {res['fixed']['ms_per_decode_step']:.1f} ms/step", flush=True)
    except Exception as e:  # noqa: BLE001
        res["fixed"] = failed({}, e)
    try:
        if reqs is not None:
            res["workload"] = hf_workload(model, reqs, pad_id)
            print(f"[hf] workload: {res['workload']['completion_tokens_per_second']:.1f} tok/s",
                  flush=True)
    except Exception as e:  # noqa: BLE001
        res["workload"] = failed({}, e)
    del model
    gc.collect()
    return res


# ----------------------------------------------------------------------------- ds3dist

class _IgnoreEos:
    """Stands in for a tokenizer so that ds3dist.generate never stops early: an EOS id no
    token has, no BOS (the prompts are token ids), and an empty decode."""

    eos_token_id = -1
    bos_token_id = None

    def decode(self, ids, **kw) -> str:
        return ""


def ds3dist_fixed(bf16_dir: Path, prompts: list[list[int]], new_tokens: int,
                  repeats: int) -> dict:
    import ds3dist

    model = ds3dist.load_model(str(bf16_dir))  # default dtype: float32 on CPUs without bf16
    print(f"[ds3dist] compute dtype {model.dtype}", flush=True)
    tok = _IgnoreEos()

    def gen(ps, n):
        return ds3dist.generate(model, tok, ps, max_new_tokens=n, temperature=0)

    gen(prompts[:2], 4)  # warm-up
    t1, _ = best_of(repeats, gen, prompts, 1)
    tn, out = best_of(repeats, gen, prompts, new_tokens)
    model = None  # free it before the launch runs
    gc.collect()
    return fixed_row(t1, tn, new_tokens, tokens_per_prompt=[len(r.token_ids) for r in out])


def ds3dist_engine_fixed(bf16_dir: Path, prompts: list[list[int]], new_tokens: int,
                        repeats: int) -> dict:
    """The fixed batch through the Python API's Engine, pp1ep1 (one Ray actor), its defaults
    (threads per rank as the launch gives them)."""
    from ds3dist import Engine, ParallelLayout

    with Engine(str(bf16_dir), ParallelLayout(pp=1, ep=1)) as engine:
        engine.tokenizer = _IgnoreEos()

        def gen(ps, n):
            return engine.generate(ps, max_new_tokens=n, temperature=0)

        gen(prompts[:2], 4)  # warm-up
        t1, _ = best_of(repeats, gen, prompts, 1)
        tn, out = best_of(repeats, gen, prompts, new_tokens)
        threads = engine.threads_per_rank
    return fixed_row(t1, tn, new_tokens, threads_per_rank=threads,
                     tokens_per_prompt=[len(r.token_ids) for r in out])


def ds3dist_launch(model_dir: Path, preset: str, reqs: list[dict], work: Path,
                   timeout: float, control: str, run: int = 0) -> dict:
    """The workload through `python -m ds3dist.launch` (single-rank layout) with
    runtime.control=control: `local` is one process, the others one Ray actor (pp1ep1)."""
    inp, out = work / "workload.jsonl", work / f"launch_{control}_{run}" / "results.jsonl"
    write_openai_batch(reqs, inp)
    cmd = [sys.executable, "-m", "ds3dist.launch", f"model={preset}", f"model.path={model_dir}",
           f"job.input={inp}", f"job.output={out}", "job.progress=false",
           f"runtime.control={control}"]
    print("[ds3dist] " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        raise RowFailed(f"launch exited {proc.returncode}: {last_error_line(text)}",
                        "stderr/stdout tail:\n" + tail_of(text))
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    thr, counts = summary.get("throughput") or {}, summary.get("counts") or {}
    return {"wall_seconds": wall, "completion_tokens": (summary.get("tokens") or {}).get("completion"),
            "requested_tokens": sum(r["max_tokens"] for r in reqs),
            "completion_tokens_per_second": thr.get("completion_tokens_per_second"),
            "generate_seconds": thr.get("generate_seconds"),
            "finish_reason": counts.get("finish_reason"),
            "request_errors": counts.get("errors", 0) + counts.get("failed", 0)}


def run_ds3dist(bf16_dir: Path, preset: str, prompts, new_tokens, reqs, work: Path,
                timeout: float, repeats: int, launch_repeats: int = 1) -> dict:
    res: dict = {}
    try:
        res["fixed"] = ds3dist_fixed(bf16_dir, prompts, new_tokens, repeats)
        print(f"[ds3dist] fixed batch: {res['fixed']['ms_per_decode_step']:.1f} ms/step",
              flush=True)
    except Exception as e:  # noqa: BLE001
        res["fixed"] = failed({}, e)
    try:
        res["fixed_engine"] = ds3dist_engine_fixed(bf16_dir, prompts, new_tokens, repeats)
        print(f"[ds3dist] fixed batch, Engine pp1ep1: "
              f"{res['fixed_engine']['ms_per_decode_step']:.1f} ms/step", flush=True)
    except Exception as e:  # noqa: BLE001
        res["fixed_engine"] = failed({}, e)
    for run in range(launch_repeats):  # alternating, so that both see the same machine
        for control, key in (("auto", "workload"), ("local", "workload_local")):
            try:
                row = ds3dist_launch(bf16_dir, preset, reqs, work, timeout, control, run)
            except Exception as e:  # noqa: BLE001
                res.setdefault(key, failed({}, e))
                continue
            print(f"[ds3dist] launch workload, runtime.control={control}: "
                  f"{row['completion_tokens_per_second']} tok/s", flush=True)
            best = res.get(key) or {}
            if (best.get("completion_tokens_per_second") or 0) < \
                    (row["completion_tokens_per_second"] or 0):
                res[key] = row
    return res


# ----------------------------------------------------------------------------- vLLM

def vllm_version(python: str) -> str | None:
    """vLLM's version under that python, or None (with a printed note) when unusable."""
    if not Path(python).exists():
        print(f"[vllm] skipped: {python} does not exist", flush=True)
        return None
    env = {**os.environ, **VLLM_ENV}
    proc = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"[vllm] skipped: `import vllm` failed under {python}: {tail[0]}", flush=True)
        return None
    return proc.stdout.strip().splitlines()[-1]


def run_vllm(python: str, bf16_dir: Path, prompts, new_tokens, reqs, work: Path,
             timeout: float, repeats: int) -> dict | None:
    version = vllm_version(python)
    if version is None:
        return None
    print(f"[vllm] vllm {version}", flush=True)
    job, result = work / "vllm_work.json", work / "vllm_result.json"
    job.write_text(json.dumps({"model": str(bf16_dir), "max_model_len": 2048,
                               "fixed": {"prompts": prompts, "new_tokens": new_tokens,
                                         "repeats": repeats},
                               "workload": reqs}))
    env = {**os.environ, **VLLM_ENV}
    proc = subprocess.run([python, str(HERE / "_vllm_worker.py"), str(job), str(result)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=work)
    if proc.returncode != 0 or not result.exists():
        text = proc.stderr + proc.stdout
        err = failed({}, RowFailed(f"worker exited {proc.returncode}: {last_error_line(text)}",
                                   "stderr/stdout tail:\n" + tail_of(text)))
        return {"version": version, "fixed": err, "workload": dict(err)}
    res = json.loads(result.read_text())
    res["version"] = res.pop("vllm_version", version)
    return res


# ----------------------------------------------------------------------------- report

def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _get(res: dict, engine: str, part: str, key: str):
    return ((res.get(engine) or {}).get(part) or {}).get(key)


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(res: dict) -> dict:
    ms = {e: _get(res, e, "fixed", "ms_per_decode_step")
          for e in ("hf", "hf_float32", "ds3dist", "vllm")}
    tps = {e: _get(res, e, "workload", "completion_tokens_per_second")
           for e in ("hf", "ds3dist", "vllm")}
    return {
        "decode_speedup_ds3dist_vs_hf": _ratio(ms["hf"], ms["ds3dist"]),
        "decode_speedup_ds3dist_vs_hf_float32": _ratio(ms["hf_float32"], ms["ds3dist"]),
        "decode_speedup_ds3dist_vs_vllm": _ratio(ms["vllm"], ms["ds3dist"]),
        "workload_tok_s_ds3dist_launch_vs_vllm": _ratio(tps["ds3dist"], tps["vllm"]),
        "workload_tok_s_ds3dist_launch_vs_hf": _ratio(tps["ds3dist"], tps["hf"]),
        "workload_tok_s_ds3dist_local_launch_vs_vllm": _ratio(
            _get(res, "ds3dist", "workload_local", "completion_tokens_per_second"), tps["vllm"]),
        "workload_tok_s_pp1ep1_vs_local": _ratio(
            tps["ds3dist"], _get(res, "ds3dist", "workload_local", "completion_tokens_per_second")),
    }


def print_table(res: dict) -> None:
    engines = [("hf", "HF bfloat16"), ("hf_float32", "HF float32"), ("ds3dist", "ds3dist"),
               ("vllm", "vLLM CPU")]
    print("\n" + "=" * 78)
    print(f"{'engine':18} {'decode ms/step':>15} {'workload tok/s':>15} {'workload wall s':>16}"
          f"  note")
    for key, name in engines:
        r = res.get(key)
        if r is None:
            print(f"{name:18} {'skipped':>15}")
            continue
        note = "; ".join(f"{part} failed: {r[part]['error'][:90]}" for part in ("fixed", "workload")
                         if isinstance(r.get(part), dict) and "error" in r[part])
        if key == "ds3dist":
            bad = _get(res, key, "workload", "request_errors")
            extra = f"; {bad} requests refused/failed: not comparable" if bad else ""
            local = _fmt(_get(res, key, "workload_local", "completion_tokens_per_second"))
            note = (f"workload via launch, pp1ep1 on Ray (one process, runtime.control=local: "
                    f"{local} tok/s)" + extra + ("; " + note if note else ""))
        print(f"{name:18} {_fmt(_get(res, key, 'fixed', 'ms_per_decode_step')):>15} "
              f"{_fmt(_get(res, key, 'workload', 'completion_tokens_per_second')):>15} "
              f"{_fmt(_get(res, key, 'workload', 'wall_seconds')):>16}  {note}")
    eng = _get(res, "ds3dist", "fixed_engine", "ms_per_decode_step")
    one = _get(res, "ds3dist", "fixed", "ms_per_decode_step")
    print(f"{'ds3dist Engine':18} {_fmt(eng):>15} {'':>15} {'':>16}  pp1ep1 from the Python API "
          f"({_get(res, 'ds3dist', 'fixed_engine', 'threads_per_rank')} threads per rank); "
          f"one process / Engine {_fmt(_ratio(eng, one), '.2f')}")
    fl = res.get("floor") or {}
    if fl:
        multiples = {name: _ratio(_get(res, key, "fixed", "ms_per_decode_step"),
                                  fl["floor_ms_per_step"]) for key, name in engines}
        multiples["ds3dist Engine"] = _ratio(eng, fl["floor_ms_per_step"])
        print(f"floor:    {fl['floor_ms_per_step']:.1f} ms/step ({fl['decode_step_gb']:.2f} GB "
              f"at {fl['memory_gbps']:.1f} GB/s; {fl['cpu_flags']}); decode step / floor: " +
              ", ".join(f"{n} {_fmt(m, '.1f')}x" for n, m in multiples.items() if m))
    r = ratios(res)
    print("-" * 78)
    print(f"decode:   ds3dist vs HF   {_fmt(r['decode_speedup_ds3dist_vs_hf'], '.2f')}x faster"
          f" (target >= 2x); vs HF float32 "
          f"{_fmt(r['decode_speedup_ds3dist_vs_hf_float32'], '.2f')}x")
    print(f"decode:   ds3dist vs vLLM {_fmt(r['decode_speedup_ds3dist_vs_vllm'], '.2f')}x faster")
    print(f"workload: ds3dist launch vs vLLM {_fmt(r['workload_tok_s_ds3dist_launch_vs_vllm'], '.2f')}x"
          f" completion tok/s (one process: "
          f"{_fmt(r['workload_tok_s_ds3dist_local_launch_vs_vllm'], '.2f')}x); vs HF "
          f"{_fmt(r['workload_tok_s_ds3dist_launch_vs_hf'], '.2f')}x; pp1ep1 / one process "
          f"{_fmt(r['workload_tok_s_pp1ep1_vs_local'], '.2f')}")
    print("=" * 78)


# ----------------------------------------------------------------------------- main

def memory_gbps(threads: int = 2, mib: int = 256, repeats: int = 5) -> float:
    """This machine's read bandwidth: the fastest sum of a `mib` MiB float32 tensor on
    `threads` torch threads, GB/s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4)
        best, _ = best_of(repeats, x.sum)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / best / 1e9


def decode_step_bytes(cfg_dir: Path, rows: int, keys: int) -> float:
    """Bytes a bf16 decode step of `rows` sequences with `keys` cached tokens each reads in one
    process (the planner's figure: the experts the step's copies reach, the other weights,
    the rows' embeddings, the cache)."""
    import torch

    from ds3dist.config import ModelConfig
    from ds3dist.jobs.memory_plan import Holding, rank_bytes
    from ds3dist.parallel.layout import ParallelLayout
    from ds3dist.plan.estimate import step_read_bytes

    cfg, layout = ModelConfig.from_json(cfg_dir), ParallelLayout(pp=1, ep=1)
    holding = Holding(execution="bf16", dtype=torch.bfloat16)
    rb = rank_bytes(cfg, layout, holding)[0]
    return step_read_bytes(cfg, 2, 0, layout, rb, rows, keys, decode=True)


def floor_figures(bf16_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    gbps = memory_gbps()
    step = decode_step_bytes(bf16_dir, len(prompts), len(prompts[0]) + new_tokens // 2)
    floor = {"memory_gbps": gbps, "decode_step_gb": step / 1e9,
             "floor_ms_per_step": step / (gbps * 1e9) * 1e3, "cpu_flags": cpu_summary()}
    print(f"[floor] reads {gbps:.1f} GB/s (256 MiB float32 sum, 2 threads); a decode step reads "
          f"{step / 1e9:.2f} GB: floor {floor['floor_ms_per_step']:.1f} ms/step; "
          f"CPU: {floor['cpu_flags']}", flush=True)
    return floor


def cpu_summary() -> str:
    """The CPU's vector features that decide the kernels' speed, and the build in use."""
    from ds3dist.model import cpu_kernel
    from ds3dist.model.options import cpu_flags

    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "asimd",
            "asimddp", "sve")
    have = [f for f in keep if f in cpu_flags()]
    return f"{' '.join(have) or 'unknown'}; kernels {cpu_kernel.active_isa()}"


def workloads(id_limit: int, quick: bool, seed: int):
    """(fixed prompts, new tokens, mixed requests) for a full or a --quick run."""
    prompts = fixed_prompts(id_limit, 8, 32, seed)
    if quick:
        return prompts, 16, mixed_workload(id_limit, 8, 16, 128, 8, 32, seed + 1)
    return prompts, 64, mixed_workload(id_limit, 48, 16, 1024, 8, 128, seed + 1)


def token_id_limit(ckpt: Path, cfg: dict) -> int:
    """Upper bound for prompt ids: the tokenizer's vocab size when it is smaller than the
    model's (the launch refuses ids the tokenizer does not have), else config vocab_size."""
    limit = int(cfg["vocab_size"])
    try:
        from ds3dist.tokenizer import load_tokenizer

        n = getattr(load_tokenizer(ckpt), "vocab_size", None)
        return min(limit, int(n)) if n else limit
    except Exception as e:  # noqa: BLE001 - no tokenizer: the model's vocabulary
        print(f"[setup] no tokenizer ({e}); ids drawn below vocab_size {limit}", flush=True)
        return limit


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    retain_freed_memory()  # for every engine run in this process (HF too), as ranks do
    _, bf16 = ensure_checkpoints(args.preset, args.ckpt_dir, 0)
    cfg = json.loads((bf16 / "config.json").read_text())
    id_limit = token_id_limit(bf16, cfg)
    prompts, new_tokens, reqs = workloads(id_limit, args.quick, args.seed)
    pad_id = int(cfg.get("eos_token_id") or 1)
    res: dict = {"preset": args.preset, "checkpoint": str(bf16), "quick": args.quick,
                 "token_id_limit": id_limit,
                 "fixed_batch": {"prompts": len(prompts), "prompt_len": len(prompts[0]),
                                 "new_tokens": new_tokens},
                 "workload": {"requests": len(reqs),
                              "prompt_tokens": sum(len(r["prompt"]) for r in reqs),
                              "max_tokens": sum(r["max_tokens"] for r in reqs)}}
    print(f"[setup] {args.preset}: {bf16}; fixed {len(prompts)}x{len(prompts[0])} -> "
          f"{new_tokens} new; workload {res['workload']}", flush=True)
    res["floor"] = floor_figures(bf16, prompts, new_tokens)
    work = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    try:
        if not args.skip_hf:
            for dt in args.hf_dtypes.split(","):
                key = "hf" if dt == "bfloat16" else f"hf_{dt}"
                res[key] = run_hf(bf16, prompts, new_tokens,
                                  reqs if dt in args.hf_workload_dtypes.split(",") else None,
                                  pad_id, args.repeats, dt)
        if not args.skip_ds3dist:
            res["ds3dist"] = run_ds3dist(bf16, args.preset, prompts, new_tokens, reqs, work,
                                         args.launch_timeout, args.repeats, args.launch_repeats)
        if not args.skip_vllm:
            res["vllm"] = run_vllm(args.vllm_python, bf16, prompts, new_tokens, reqs, work,
                                   args.launch_timeout, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["ratios"] = ratios(res)
    print_table(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
        print(f"figures written to {args.out}")
    return res


if __name__ == "__main__":
    main()
