"""Resumable offline batch generation: JSONL of prompts in, JSONL of results out.

The input formats and their parsing are in `ds3dist.jobs.requests`, the output records and
files in `ds3dist.jobs.records`, the summary and expert-load plot in `ds3dist.jobs.report`;
this module runs the job.

Requests with equal sampling parameters are batched together. Batches are planned over the
whole valid input (not only what is left to do), so a resumed run feeds the engine exactly the
batches an uninterrupted run would. Each batch's output lines are appended with one write and
fsync'd; a rerun with the same output file skips requests already there (a truncated last line
left by a kill is cut off first). The errors file is rewritten by every run. The output file is
locked while a job writes it, so two jobs cannot interleave their lines.

The engine is a parameter: anything with `generate(prompts, max_new_tokens=, temperature=,
top_p=, top_k=, seed=, stop=)` returning results with `.token_ids`, `.text`, `.finish_reason`
(and optionally `.prompt_tokens`), and optionally `stats()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ds3dist.jobs.records import (
    append_records,
    native_record,
    openai_error_record,
    openai_record,
    scan_output,
    write_errors,
)
from ds3dist.jobs.report import engine_stats, plot_expert_load, write_summary
from ds3dist.jobs.requests import (
    DEFAULT_SAMPLING,
    PromptEncoder,
    Request,
    detect_format,
    is_int,
    parse_input,
    sampling_key,
)

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot run at all (unreadable input, output locked by another job, ...)."""


def default_paths(output: str | Path, errors: str | Path | None = None,
                  summary: str | Path | None = None,
                  plot: str | Path | None = None) -> tuple[Path, Path, Path, Path]:
    out = Path(output)
    return (
        out,
        Path(errors) if errors else out.with_name(out.name + ".errors.jsonl"),
        Path(summary) if summary else out.with_name(out.name + ".summary.json"),
        Path(plot) if plot else out.with_name(out.name + ".expert_load.png"),
    )


@contextlib.contextmanager
def _locked_output(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"job.output: {path} is being written by another job") from None
        yield fd
    finally:
        os.close(fd)


# ---- the job ----------------------------------------------------------------------------
def run_batch_job(
    engine: Any,
    tokenizer: Any,
    input_path: str | Path,
    output_path: str | Path,
    *,
    sampling: dict[str, Any] | None = None,
    batch_size: int = 8,
    errors_path: str | Path | None = None,
    summary_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    max_prompt_tokens: int | None = None,
    max_position_embeddings: int | None = None,
    fmt: str = "auto",
    model_name: str = "ds3dist",
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    mtp_layers: Sequence[int] = (),
) -> dict[str, Any]:
    """Run (or resume) a batch job; return the summary (also written to the summary path)."""
    t_start = time.perf_counter()
    if batch_size < 1:
        raise JobError(f"job.batch_size: must be >= 1, got {batch_size}")
    defaults = {**DEFAULT_SAMPLING, **(sampling or {})}
    in_path = Path(input_path)
    out_path, err_path, sum_path, png_path = default_paths(output_path, errors_path,
                                                           summary_path, plot_path)
    try:
        lines = in_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise JobError(f"job.input: cannot read {in_path}: {e.strerror}") from None

    if max_prompt_tokens is not None:
        limit, limit_name = int(max_prompt_tokens), "job.max_prompt_tokens"
    elif max_position_embeddings is not None:
        limit, limit_name = int(max_position_embeddings), "max_position_embeddings"
    else:
        limit, limit_name = 1 << 62, "unlimited"
    enc = PromptEncoder(tokenizer, limit, limit_name, max_position_embeddings)
    if fmt == "auto":
        fmt = detect_format(lines)
    if fmt not in ("native", "openai"):
        raise JobError(f"job.format: must be auto, native or openai, got {fmt!r}")
    parsed = parse_input(lines, fmt, enc, defaults)
    write_errors(err_path, parsed.errors)
    for e in parsed.errors:
        log.warning("input line %d: %s", e.line, e.message)

    # Plan batches over all valid requests, grouped by sampling parameters (first-seen order).
    groups: dict[str, list[Request]] = {}
    for r in parsed.requests:
        groups.setdefault(sampling_key(r.sampling), []).append(r)
    batches = [g[i: i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    created = int(time.time())
    counts = {"stop": 0, "length": 0}
    prompt_tokens = completion_tokens = generated = 0
    gen_seconds = 0.0
    with _locked_output(out_path) as fd:
        done, _ = scan_output(fd, fmt)
        already = sum(r.key in done for r in parsed.requests)
        if fmt == "openai":  # malformed requests get their own output lines
            append_records(fd, [openai_error_record(e) for e in parsed.errors
                                if e.key is not None and e.key not in done])
        todo = [b for b in batches if any(r.key not in done for r in b)]
        n_todo = sum(r.key not in done for b in todo for r in b)

        from tqdm import tqdm

        bar = tqdm(total=n_todo, unit="seq", desc="generate", disable=not progress,
                   dynamic_ncols=True)
        try:
            for batch in todo:
                s = batch[0].sampling
                t0 = time.perf_counter()
                results = engine.generate(
                    [r.prompt_ids for r in batch],
                    max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                    top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"], stop=s["stop"],
                )
                gen_seconds += time.perf_counter() - t0
                results = list(results)
                if len(results) != len(batch):
                    raise JobError(f"engine returned {len(results)} results for {len(batch)} "
                                   f"prompts")
                records = []
                for req, res in zip(batch, results):
                    if req.key in done:  # finished by an interrupted run: keep that line
                        continue
                    pt = res.prompt_tokens if is_int(getattr(res, "prompt_tokens", None)) \
                        else len(req.prompt_ids)
                    if fmt == "openai":
                        records.append(openai_record(req, res, pt, model_name, created))
                    else:
                        records.append(native_record(req, res, pt))
                    counts[res.finish_reason] = counts.get(res.finish_reason, 0) + 1
                    prompt_tokens += pt
                    completion_tokens += len(res.token_ids)
                    generated += 1
                append_records(fd, records)
                done.update(r.key for r in batch)
                bar.update(len(records))
                if gen_seconds > 0:
                    bar.set_postfix(tok_s=f"{completion_tokens / gen_seconds:.1f}",
                                    seq_s=f"{generated / gen_seconds:.2f}", refresh=False)
        finally:
            bar.close()
        _, n_records = scan_output(fd, fmt)

    stats = engine_stats(engine)
    expert_load = {str(k): list(v) for k, v in (stats.get("expert_load") or {}).items()}
    plot = plot_expert_load(expert_load, png_path, title=f"expert load: {model_name}",
                            mtp_layers=mtp_layers)
    summary = {
        "input": str(in_path),
        "output": str(out_path),
        "errors_file": str(err_path),
        "plot": None if plot is None else str(plot),
        "format": fmt,
        "counts": {
            "lines": parsed.lines,
            "valid": len(parsed.requests),
            "errors": len(parsed.errors),
            "already_done": already,
            "generated": generated,
            "output_records": n_records,
            "finish_reason": counts,
        },
        "tokens": {
            "prompt": prompt_tokens,
            "completion": completion_tokens,
            "total": prompt_tokens + completion_tokens,
        },
        "throughput": {
            "generate_seconds": round(gen_seconds, 4),
            "wall_seconds": round(time.perf_counter() - t_start, 4),
            "sequences_per_second": round(generated / gen_seconds, 4) if gen_seconds else None,
            "completion_tokens_per_second":
                round(completion_tokens / gen_seconds, 4) if gen_seconds else None,
            "total_tokens_per_second":
                round((prompt_tokens + completion_tokens) / gen_seconds, 4) if gen_seconds
                else None,
        },
        "batches": {"planned": len(batches), "run": len(todo), "batch_size": batch_size,
                    "sampling_groups": len(groups)},
        "stage_seconds": list(stats.get("stage_seconds") or []),
        "expert_load": expert_load,
        "ranks": list(stats.get("ranks") or []),
    }
    if meta:
        summary["meta"] = meta
    write_summary(sum_path, summary)
    summary["summary"] = str(sum_path)
    return summary

