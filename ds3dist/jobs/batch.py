"""Resumable offline batch generation: JSONL of prompts in, JSONL of results out.

The input file is read by `ds3dist.jobs.input_text` and parsed by `ds3dist.jobs.requests`; the
output file (lock, append, resume scan) is `ds3dist.jobs.output_file`, its records
`ds3dist.jobs.records`; the summary and expert-load plot are `ds3dist.jobs.report`. This
module runs the job.

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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from ds3dist.jobs.errors import JobError
from ds3dist.jobs.input_text import InputText, read_input
from ds3dist.jobs.output_file import OutputFile
from ds3dist.jobs.records import (
    native_record,
    openai_error_record,
    openai_record,
    output_key,
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

__all__ = ["JobError", "default_paths", "run_batch_job"]


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


# ---- the job ----------------------------------------------------------------------------
@dataclass
class _Tally:
    """What this run generated."""
    finish: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0})
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0
    seconds: float = 0.0

    def add(self, res: Any, prompt_tokens: int) -> None:
        self.finish[res.finish_reason] = self.finish.get(res.finish_reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += len(res.token_ids)
        self.generated += 1


def run_batch_job(
    engine: Any,
    tokenizer: Any,
    input_path: str | Path | InputText,
    output_path: str | Path | OutputFile,
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
    """Run (or resume) a batch job; return the summary (also written to the summary path).

    input_path: a path, or the already-read `InputText`; output_path: a path, or an
    `OutputFile` the caller opened (and locked) and closes.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise JobError(f"job.batch_size: must be >= 1, got {batch_size}")
    inp = input_path if isinstance(input_path, InputText) else read_input(input_path)
    own = not isinstance(output_path, OutputFile)
    out = OutputFile.open(output_path) if own else output_path
    try:
        _, err_path, sum_path, png_path = default_paths(out.path, errors_path, summary_path,
                                                        plot_path)
        fmt = detect_format(inp.lines) if fmt == "auto" else fmt
        if fmt not in ("native", "openai"):
            raise JobError(f"job.format: must be auto, native or openai, got {fmt!r}")
        enc = _encoder(tokenizer, max_prompt_tokens, max_position_embeddings)
        parsed = parse_input(inp.lines, fmt, enc, {**DEFAULT_SAMPLING, **(sampling or {})},
                             inp.bad_lines)
        write_errors(err_path, parsed.errors)
        for e in parsed.errors:
            log.warning("input line %d: %s", e.line, e.message)
        batches, n_groups = _plan_batches(parsed.requests, batch_size)
        done = out.scan(lambda rec: output_key(rec, fmt))
        already = sum(r.key in done for r in parsed.requests)
        if fmt == "openai":  # malformed requests get their own output lines
            out.append([openai_error_record(e) for e in parsed.errors
                        if e.key is not None and e.key not in done])
        todo = [b for b in batches if any(r.key not in done for r in b)]
        tally = _generate(engine, todo, done, out, fmt, model_name, progress)
        n_records = out.records
    finally:
        if own:
            out.close()

    stats = engine_stats(engine)
    expert_load = {str(k): list(v) for k, v in (stats.get("expert_load") or {}).items()}
    plot = plot_expert_load(expert_load, png_path, title=f"expert load: {model_name}",
                            mtp_layers=mtp_layers)
    summary = {
        "input": str(inp.path),
        "output": str(out.path),
        "errors_file": str(err_path),
        "plot": None if plot is None else str(plot),
        "format": fmt,
        "input_encoding": inp.encoding,
        "counts": {
            "lines": parsed.lines,
            "valid": len(parsed.requests),
            "errors": len(parsed.errors),
            "already_done": already,
            "generated": tally.generated,
            "output_records": n_records,
            "finish_reason": tally.finish,
        },
        "tokens": {
            "prompt": tally.prompt_tokens,
            "completion": tally.completion_tokens,
            "total": tally.prompt_tokens + tally.completion_tokens,
        },
        "throughput": _throughput(tally, time.perf_counter() - t_start),
        "batches": {"planned": len(batches), "run": len(todo), "batch_size": batch_size,
                    "sampling_groups": n_groups},
        "stage_seconds": list(stats.get("stage_seconds") or []),
        "expert_load": expert_load,
        "ranks": list(stats.get("ranks") or []),
    }
    if meta:
        summary["meta"] = meta
    write_summary(sum_path, summary)
    summary["summary"] = str(sum_path)
    return summary


def _encoder(tokenizer: Any, max_prompt_tokens: int | None,
             max_position_embeddings: int | None) -> PromptEncoder:
    if max_prompt_tokens is not None:
        limit, limit_name = int(max_prompt_tokens), "job.max_prompt_tokens"
    elif max_position_embeddings is not None:
        limit, limit_name = int(max_position_embeddings), "max_position_embeddings"
    else:
        limit, limit_name = 1 << 62, "unlimited"
    return PromptEncoder(tokenizer, limit, limit_name, max_position_embeddings)


def _plan_batches(requests: list[Request], batch_size: int) -> tuple[list[list[Request]], int]:
    """Batches over all valid requests, grouped by sampling parameters (first-seen order), so
    a resumed job feeds the engine the same batches as an uninterrupted one."""
    groups: dict[str, list[Request]] = {}
    for r in requests:
        groups.setdefault(sampling_key(r.sampling), []).append(r)
    batches = [g[i: i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return batches, len(groups)


def _generate(engine: Any, todo: list[list[Request]], done: set[str], out: OutputFile,
              fmt: str, model_name: str, progress: bool) -> _Tally:
    tally = _Tally()
    created = int(time.time())
    n_todo = sum(r.key not in done for b in todo for r in b)
    with tqdm(total=n_todo, unit="seq", desc="generate", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in todo:
            s = batch[0].sampling
            t0 = time.perf_counter()
            results = list(engine.generate(
                [r.prompt_ids for r in batch],
                max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"], stop=s["stop"],
            ))
            tally.seconds += time.perf_counter() - t0
            if len(results) != len(batch):
                raise JobError(f"engine returned {len(results)} results for {len(batch)} prompts")
            records = []
            for req, res in zip(batch, results):
                if req.key in done:  # finished by an interrupted run: keep that line
                    continue
                pt = res.prompt_tokens if is_int(getattr(res, "prompt_tokens", None)) \
                    else len(req.prompt_ids)
                records.append(openai_record(req, res, pt, model_name, created)
                               if fmt == "openai" else native_record(req, res, pt))
                tally.add(res, pt)
            out.append(records)
            done.update(r.key for r in batch)
            bar.update(len(records))
            if tally.seconds > 0:
                bar.set_postfix(tok_s=f"{tally.completion_tokens / tally.seconds:.1f}",
                                seq_s=f"{tally.generated / tally.seconds:.2f}", refresh=False)
    return tally


def _throughput(t: _Tally, wall: float) -> dict[str, float | None]:
    def rate(n: int) -> float | None:
        return round(n / t.seconds, 4) if t.seconds else None

    return {
        "generate_seconds": round(t.seconds, 4),
        "wall_seconds": round(wall, 4),
        "sequences_per_second": rate(t.generated),
        "completion_tokens_per_second": rate(t.completion_tokens),
        "total_tokens_per_second": rate(t.prompt_tokens + t.completion_tokens),
    }
