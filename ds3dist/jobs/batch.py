"""Resumable offline batch generation: JSONL of prompts in, JSONL of results out.

The input file is read by `ds3dist.jobs.input_text` and parsed by `ds3dist.jobs.requests`; the
output file (lock, append, resume scan) is `ds3dist.jobs.output_file`, its records
`ds3dist.jobs.records`; the summary and expert-load plot are `ds3dist.jobs.report`. This
module runs the job.

Requests stream into the engine (`engine.stream(requests)`, continuous batching: each request
keeps its own sampling parameters, no batch boundaries) and every request's line is written
as soon as it ends. A seeded request draws noise keyed by (seed, its id, token index), so its
tokens do not depend on what it shares a step with: a resumed job gives the same texts as an
uninterrupted one (exactly in float32; see README on bf16). A rerun with the same output skips
the ids already there (a truncated last line left by a kill is cut off first). A request the
engine rejects (too long for the model or the cache) or that fails on its own goes to the
errors file and the job goes on. The output file is locked while a job writes it. The errors
file keeps every run's records (each distinct record once), and a run that fails still writes
its summary, with the error, before the error goes on.

The engine is a parameter, any ds3dist.core.engine.ServingEngine: its `stream` yields ended
requests, its `scheduler` counters feed the progress bar (speculative acceptance and tokens
per step), its `stats()` the summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from ds3dist.jobs.errors import JobError
from ds3dist.jobs.input_text import InputText, read_input
from ds3dist.jobs.output_file import OutputFile
from ds3dist.jobs.stop import GracefulStop
from ds3dist.jobs.records import (
    append_errors,
    native_record,
    openai_error_record,
    openai_record,
    output_key,
    record_errors,
    write_atomic,
)
from ds3dist.jobs.report import (Counts, JobSummary, Throughput, engine_stats, plot_expert_load,
                                 write_summary)
from ds3dist.jobs.requests import (
    DEFAULT_SAMPLING,
    InputLine,
    LineError,
    ParsedInput,
    PromptEncoder,
    detect_format,
    parse_input,
)
from ds3dist.core.engine import ServingEngine
from ds3dist.core.params import Sampling
from ds3dist.core.request import Request
from ds3dist.core.request import RequestStatus
from ds3dist.text import GenerationResult, make_request, result_of

log = logging.getLogger(__name__)

__all__ = ["JobError", "default_paths", "expert_load_path", "run_batch_job"]

STOPPED_STATS_S = 10.0  # a failed or stopped run waits at most this for the engine's figures


def expert_load_path(output: str | Path) -> Path:
    """Where a job writes its expert load (ds3dist.balance's input): beside the output."""
    out = Path(output)
    return out.with_name(out.name + ".expert_load.json")


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
    failed: int = 0
    drained: int = 0  # ended after a stop was asked for
    seconds: float = 0.0

    def add(self, res: GenerationResult) -> None:
        self.finish[res.finish_reason] = self.finish.get(res.finish_reason, 0) + 1
        self.prompt_tokens += res.prompt_tokens
        self.completion_tokens += len(res.token_ids)
        self.generated += 1


@dataclass
class _Job:
    """The parts of a job the generation loop writes to."""
    engine: ServingEngine
    tokenizer: Any
    out: OutputFile
    errors: Path
    fmt: str
    model_name: str
    stop: GracefulStop | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Run:
    """What a run read and what it has done: its summary's sources."""
    inp: InputText
    parsed: ParsedInput
    already: int  # requests already in the output
    todo: list[InputLine]
    t_start: float
    meta: dict[str, Any] | None
    tally: _Tally = field(default_factory=_Tally)

    def summary(self, job: _Job, stats_timeout_s: float | None = None) -> JobSummary:
        """The summary as of now; the engine's expert load goes to its file first."""
        if job.stop is not None and job.stop.requested:  # its cluster may be going down
            stats_timeout_s = STOPPED_STATS_S
        stats = engine_stats(job.engine, stats_timeout_s)
        if stats.expert_load.per_layer:  # what ds3dist.balance reads
            write_atomic(expert_load_path(job.out.path),
                         json.dumps(stats.expert_load.file()) + "\n", "job.output")
        t, p = self.tally, self.parsed
        counts = Counts(lines=p.lines, valid=len(p.requests), errors=len(p.errors),
                        failed=t.failed, already_done=self.already, generated=t.generated,
                        not_run=len(self.todo) - t.generated - t.failed,
                        output_records=job.out.records, finish_reason=t.finish,
                        drained=t.drained)
        return JobSummary(
            input=str(self.inp.path), output=str(job.out.path), errors_file=str(job.errors),
            plot=None, format=job.fmt, input_encoding=self.inp.encoding, counts=counts,
            prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
            throughput=_throughput(t, time.perf_counter() - self.t_start), engine=stats,
            stopped=job.stop.signal if job.stop is not None else None, meta=self.meta or None)


def run_batch_job(
    engine: ServingEngine,
    tokenizer: Any,
    input_path: str | Path | InputText,
    output_path: str | Path | OutputFile,
    *,
    sampling: Sampling | None = None,
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
    stop: GracefulStop | None = None,
) -> JobSummary:
    """Run (or resume) a batch job; return the summary (also written to the summary path).

    input_path: a path, or the already-read `InputText`; output_path: a path, or an
    `OutputFile` the caller opened (and locked) and closes. stop: once it is requested no
    request is admitted (the summary's `stopped` names the signal; `counts.not_run` says
    how many requests a rerun has left).
    """
    t_start = time.perf_counter()
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
        parsed = parse_input(inp.lines, fmt, enc, sampling or DEFAULT_SAMPLING,
                             inp.bad_lines)
        already, todo = _resume(parsed, fmt, out, err_path)
        run = _Run(inp, parsed, already, todo, t_start, meta)
        job = _Job(engine, tokenizer, out, err_path, fmt, model_name, stop)
        summary = _generate_all(job, run, progress, sum_path)
    finally:
        if own:
            out.close()
    write_summary(sum_path, summary)
    summary.summary = str(sum_path)
    # the plot last: the summary is on disk before it
    plot = plot_expert_load(summary.engine.expert_load.as_dict(), png_path,
                            title=f"expert load: {model_name}", mtp_layers=mtp_layers)
    if plot is not None:
        summary.plot = str(plot)
        write_summary(sum_path, summary)
    return summary


def _generate_all(job: _Job, run: _Run, progress: bool, sum_path: Path) -> JobSummary:
    """Every request to do through the engine; the run's summary (a run that fails writes
    its summary, with the error, before the error goes on)."""
    if job.stop is not None:
        job.stop.generating = True
    try:
        _generate(job, run.todo, progress, run.tally)
    except BaseException as e:  # the summary still says what this run did
        job.out.sync()
        _fail_summary(sum_path, e, run, job)
        raise
    if job.stop is not None:
        job.stop.drained()  # nothing in flight: the closing work is not the drain's
    job.out.sync()
    return run.summary(job)


def _resume(parsed, fmt: str, out: OutputFile, err_path: Path) -> tuple[int, list[InputLine]]:
    """Record the malformed lines; (requests already in the output, requests to run)."""
    record_errors(err_path, parsed.errors)
    for e in parsed.errors:
        log.warning("input line %d: %s", e.line, e.message)
    done = out.scan(lambda rec: output_key(rec, fmt))
    if fmt == "openai":  # malformed requests get their own output lines
        out.append([openai_error_record(e) for e in parsed.errors
                    if e.key is not None and e.key not in done])
    return (sum(r.key in done for r in parsed.requests),
            [r for r in parsed.requests if r.key not in done])


def _fail_summary(path: Path, error: BaseException, run: _Run, job: _Job) -> None:
    """The summary of a run that failed: what it did, and the error (`error`). A failure to
    write it is logged; the run's own error is the one raised."""
    try:
        summary = run.summary(job, STOPPED_STATS_S)
        summary.error = f"{type(error).__name__}: {error}"
        write_summary(path, summary)
    except Exception as e:
        log.warning("could not write the summary of the failed run: %s", e)


def _encoder(tokenizer: Any, max_prompt_tokens: int | None,
             max_position_embeddings: int | None) -> PromptEncoder:
    if max_prompt_tokens is not None:
        limit, limit_name = int(max_prompt_tokens), "job.max_prompt_tokens"
    elif max_position_embeddings is not None:
        limit, limit_name = int(max_position_embeddings), "max_position_embeddings"
    else:
        limit, limit_name = 1 << 62, "unlimited"
    return PromptEncoder(tokenizer, limit, limit_name, max_position_embeddings)


def _engine_request(line: InputLine, tokenizer: Any) -> Request:
    """The engine's request for an input line: its own sampling parameters and stop rule;
    its id is the line's identity, so its seeded draws are the same in every run."""
    s = line.sampling
    return make_request(tokenizer, line.key, line.prompt_ids, s.params, s.max_new_tokens,
                        list(s.stop))


def _generate(job: _Job, todo: list[InputLine], progress: bool, tally: _Tally) -> None:
    by_key = {r.key: r for r in todo}
    t0 = time.perf_counter()
    with tqdm(total=len(todo), unit="req", desc="generate", disable=not progress,
              dynamic_ncols=True) as bar:
        for ended in job.engine.stream(_admitted(job, todo)):
            _write(job, by_key[ended.id], ended, tally)
            tally.seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(tok_s=f"{tally.completion_tokens / max(tally.seconds, 1e-9):.1f}",
                            **_speculative_postfix(job.engine), refresh=False)


def _admitted(job: _Job, todo: list[InputLine]) -> Iterator[Request]:
    """The engine's requests, until a stop is requested."""
    for r in todo:
        if job.stop is not None and job.stop.requested:
            return
        yield _engine_request(r, job.tokenizer)


def _speculative_postfix(engine: ServingEngine) -> dict[str, str]:
    """Acceptance per draft position and tokens per step, while speculating."""
    sched = engine.scheduler
    if sched is None or not sched.cfg.num_drafts:
        return {}
    spec = sched.stats.speculative()
    acc = "/".join(f"{a:.2f}" for a in spec["acceptance_per_position"] if a is not None)
    tps = spec["tokens_per_step"]
    return {"accept": acc or "-", "tok_step": f"{tps:.2f}" if tps else "-"}


def _write(job: _Job, line: InputLine, ended: Request, tally: _Tally) -> None:
    """The output line (or errors-file entry) of a request that ended."""
    res = result_of(ended, job.tokenizer)
    if job.stop is not None and job.stop.requested:
        tally.drained += 1
    if res.finish_reason != "error":
        job.out.append([openai_record(line, res, res.prompt_tokens, job.model_name, job.created)
                        if job.fmt == "openai" else native_record(line, res, res.prompt_tokens)])
        tally.add(res)
        return
    code = "context_length_exceeded" if ended.status is RequestStatus.REJECTED else "engine_error"
    err = LineError(line=line.line, id=line.id, code=code, message=res.error or code,
                    key=line.key if job.fmt == "openai" else None)
    log.warning("input line %d: %s", line.line, err.message)
    append_errors(job.errors, [err])
    if job.fmt == "openai":
        job.out.append([openai_error_record(err)])
    tally.failed += 1


def _throughput(t: _Tally, wall: float) -> Throughput:
    def rate(n: int) -> float | None:
        return round(n / t.seconds, 4) if t.seconds else None

    return Throughput(generate_seconds=round(t.seconds, 4), wall_seconds=round(wall, 4),
                      sequences_per_second=rate(t.generated),
                      completion_tokens_per_second=rate(t.completion_tokens),
                      total_tokens_per_second=rate(t.prompt_tokens + t.completion_tokens))
