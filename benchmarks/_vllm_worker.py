"""vLLM half of benchmarks/bench_serving.py; run with the python of a venv that has vLLM.

    VLLM_MLA_DISABLE=1 VLLM_CPU_KVCACHE_SPACE=4 /path/to/vllm-venv/bin/python \
        benchmarks/_vllm_worker.py WORK.json RESULT.json

WORK.json: {"model": BF16_DIR, "max_model_len": 2048,
            "fixed": {"prompts": [[ids...], ...], "new_tokens": 64, "repeats": 3} or null,
            "workload": [{"prompt": [ids...], "max_tokens": n}, ...] or null}
RESULT.json: {"vllm_version", "torch_version", "load_seconds",
              "fixed": {"ms_per_decode_step", "seconds_1", "seconds_n", "new_tokens", ...},
              "workload": {"wall_seconds", "completion_tokens", "completion_tokens_per_second"}}

Greedy (temperature 0, ignore_eos) on token-id prompts, no tokenizer. Decode-step time is
(time for new_tokens tokens - time for 1 token) / (new_tokens - 1), each the fastest of
`repeats` generate calls.
The workload is one generate call with a SamplingParams per request (vLLM schedules it).
Imports vLLM only under __main__ (its engine starts worker processes that re-import this file).
"""

from __future__ import annotations

import json
import os
import sys
import time


def timed_generate(llm, prompts, params, repeats: int = 1) -> tuple[float, list]:
    """(fastest of `repeats` generate calls, the last call's outputs)."""
    times, outs = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return min(times), outs


def run_fixed(llm, fixed: dict) -> dict:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in fixed["prompts"]]
    n, repeats = int(fixed["new_tokens"]), int(fixed.get("repeats", 1))

    def params(k):
        return SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)

    timed_generate(llm, prompts[:2], params(4))  # warm-up
    t1, _ = timed_generate(llm, prompts, params(1), repeats)
    tn, outs = timed_generate(llm, prompts, params(n), repeats)
    got = [len(o.outputs[0].token_ids) for o in outs]
    return {"ms_per_decode_step": 1000.0 * (tn - t1) / (n - 1), "seconds_1": t1,
            "seconds_n": tn, "new_tokens": n, "tokens_per_prompt": got}


def run_workload(llm, workload: list[dict]) -> dict:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": r["prompt"]} for r in workload]
    params = [SamplingParams(max_tokens=int(r["max_tokens"]), temperature=0, ignore_eos=True)
              for r in workload]
    wall, outs = timed_generate(llm, prompts, params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_seconds": wall, "completion_tokens": tokens,
            "completion_tokens_per_second": tokens / wall if wall > 0 else None}


def main(work_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_MLA_DISABLE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    import vllm
    from vllm import LLM

    with open(work_path) as f:
        work = json.load(f)
    t0 = time.perf_counter()
    llm = LLM(model=work["model"], dtype="bfloat16", max_model_len=int(work.get("max_model_len", 2048)),
              skip_tokenizer_init=True)
    result = {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
              "load_seconds": time.perf_counter() - t0}
    if work.get("fixed"):
        result["fixed"] = run_fixed(llm, work["fixed"])
    if work.get("workload"):
        result["workload"] = run_workload(llm, work["workload"])
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: _vllm_worker.py WORK.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
