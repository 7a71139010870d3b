"""Resumable offline batch generation: JSONL of prompts in, JSONL of results out.

Two input formats, detected per file (`fmt="auto"`) from the first JSON object line:

native  `{"id": 7, "prompt": "..."}` or `{"id": "a", "messages": [{"role": ..., "content": ...}]}`
        with optional per-line sampling keys (max_new_tokens, temperature, top_p, top_k, seed,
        stop). Output: `{"id", "text", "token_ids", "finish_reason", "usage": {"prompt_tokens",
        "completion_tokens"}}`. A malformed line goes only to the errors file.
openai  the OpenAI batch-file format, `{"custom_id", "method": "POST", "url":
        "/v1/chat/completions" | "/v1/completions", "body": {"messages" | "prompt",
        "max_tokens", "temperature", "top_p", "seed", "stop", ...}}`. Output: `{"id",
        "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion
        or text_completion>}, "error": null}`; a malformed request gets an output line with
        `"response": null, "error": {"code", "message"}` (and an errors-file entry).

Requests with equal sampling parameters are batched together. Batches are planned over the
whole valid input (not only what is left to do), so a resumed run feeds the engine exactly the
batches an uninterrupted run would. Each batch's output lines are appended with one write and
fsync'd; a rerun with the same output file skips requests already there (a truncated last line
left by a kill is cut off first). The errors file is rewritten by every run.

The engine is a parameter: anything with `generate(prompts, max_new_tokens=, temperature=,
top_p=, top_k=, seed=, stop=)` returning results with `.token_ids`, `.text`, `.finish_reason`
(and optionally `.prompt_tokens`), and optionally `stats()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
MAX_RAW = 300  # characters of an offending line kept in the errors file


class JobError(RuntimeError):
    """The job cannot run at all (unreadable input, output locked by another job, ...)."""


class _Bad(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Request:
    line: int  # 1-based line number in the input
    key: str  # identity for resume / duplicates: JSON of the id (native) or custom_id (openai)
    id: Any  # the native id or the OpenAI custom_id, as given
    prompt_ids: list[int]
    sampling: dict[str, Any]
    endpoint: str | None = None  # openai: "chat" | "completions"
    model: str | None = None  # openai: body.model, echoed back


@dataclass
class LineError:
    line: int
    id: Any
    code: str
    message: str
    raw: str | None = None
    key: str | None = None  # openai: the output line's identity (None: no output line)


@dataclass
class ParsedInput:
    format: str
    requests: list[Request] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    lines: int = 0  # non-blank lines


# ---- small helpers ---------------------------------------------------------------------
def id_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def _req_hash(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _check_sampling(over: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> dict:
    """Merge per-request overrides into the defaults; raise _Bad naming a bad key."""
    s = dict(defaults)
    for k, v in over.items():
        name = prefix + k
        if k == "max_new_tokens":
            if not _is_int(v) or v < 1:
                raise _Bad("invalid_value", f"{name}: must be an integer >= 1, got {v!r}")
        elif k == "temperature":
            if not _is_num(v) or v < 0:
                raise _Bad("invalid_value", f"{name}: must be a number >= 0, got {v!r}")
            v = float(v)
        elif k == "top_p":
            if not _is_num(v) or not 0 < v <= 1:
                raise _Bad("invalid_value", f"{name}: must be a number in (0, 1], got {v!r}")
            v = float(v)
        elif k == "top_k":
            if v is None:
                v = 0
            if not _is_int(v) or v < 0:
                raise _Bad("invalid_value", f"{name}: must be an integer >= 0, got {v!r}")
        elif k == "seed":
            if not _is_int(v):
                raise _Bad("invalid_value", f"{name}: must be an integer, got {v!r}")
        elif k == "stop":
            if isinstance(v, str):
                v = [v]
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x
                                                                      for x in v)):
                raise _Bad("invalid_value",
                           f"{name}: must be a string or a list of non-empty strings, got {v!r}")
            v = v or None
        else:  # pragma: no cover - callers pass only SAMPLING_KEYS
            continue
        s[k] = v
    return s


def sampling_key(s: dict[str, Any]) -> str:
    return json.dumps({k: s.get(k) for k in SAMPLING_KEYS}, sort_keys=True)


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        out = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(
                    part.get("text"), str):
                out.append(part["text"])
            else:
                raise _Bad("invalid_value",
                           f"{where}.content[{j}]: only {{'type': 'text', 'text': ...}} parts "
                           f"are supported")
        return "".join(out)
    raise _Bad("invalid_value", f"{where}.content: must be a string, got {type(content).__name__}")


def _messages(v: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise _Bad("invalid_value", f"{where}: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _Bad("invalid_value", f"{w}: must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise _Bad("invalid_value", f"{w}.role: unknown role {role!r}")
        if "content" not in m:
            raise _Bad("missing_required_parameter", f"{w}: missing content")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _message_text(m["content"], w)})
    return out


class PromptEncoder:
    """Turns a prompt string or chat messages into token ids and checks their length.

    Text is encoded exactly as `ds3dist.generation` encodes a string prompt (BOS prepended
    unless the text already starts with it); chat messages are first rendered with the
    tokenizer's chat template (which starts with the BOS text, so BOS appears once).
    """

    def __init__(self, tokenizer: Any, limit: int, limit_name: str,
                 max_position_embeddings: int | None = None):
        self.tok = tokenizer
        self.limit = limit
        self.limit_name = limit_name
        self.max_pos = max_position_embeddings
        self.bos = getattr(tokenizer, "bos_token_id", None)

    def prompt(self, text: str) -> list[int]:
        from ds3dist.generation import encode_prompt

        try:
            return encode_prompt(self.tok, text, self.bos)
        except ValueError as e:  # an empty prompt without a BOS token
            raise _Bad("invalid_value", f"prompt: {e}") from None

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. roles out of order)
            raise _Bad("invalid_value", f"messages: the chat template failed: {e}") from None
        return self.prompt(text)

    def check(self, ids: list[int], max_new_tokens: int) -> None:
        if len(ids) > self.limit:
            raise _Bad("context_length_exceeded",
                       f"prompt has {len(ids)} tokens, more than {self.limit_name}={self.limit}")
        if self.max_pos is not None and len(ids) + max_new_tokens > self.max_pos:
            raise _Bad("context_length_exceeded",
                       f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_position_embeddings={self.max_pos}")


# ---- input ------------------------------------------------------------------------------
def detect_format(lines: Iterable[str]) -> str:
    """'openai' when the first JSON object line has custom_id or body, else 'native'."""
    for raw in lines:
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return "openai" if ("custom_id" in obj or "body" in obj) else "native"
    return "native"


def _parse_native(obj: Any, line: int, enc: PromptEncoder, defaults: dict) -> Request:
    if not isinstance(obj, dict):
        raise _Bad("invalid_request", f"line must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise _Bad("missing_required_parameter", "missing id")
    rid = obj["id"]
    if not (isinstance(rid, str) and rid) and not _is_int(rid):
        raise _Bad("invalid_value", f"id: must be a non-empty string or an integer, got {rid!r}")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise _Bad("missing_required_parameter" if not has_p else "invalid_request",
                   "needs exactly one of prompt or messages")
    over = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    if "max_tokens" in obj and "max_new_tokens" not in obj:
        over["max_new_tokens"] = obj["max_tokens"]
    sampling = _check_sampling(over, defaults)
    if has_p:
        if not isinstance(obj["prompt"], str):
            raise _Bad("invalid_value", f"prompt: must be a string, got "
                                        f"{type(obj['prompt']).__name__}")
        ids = enc.prompt(obj["prompt"])
    else:
        ids = enc.chat(_messages(obj["messages"], "messages"))
    enc.check(ids, sampling["max_new_tokens"])
    return Request(line=line, key=id_key(rid), id=rid, prompt_ids=ids, sampling=sampling)


def _parse_openai(obj: Any, line: int, enc: PromptEncoder, defaults: dict) -> Request:
    if not isinstance(obj, dict):
        raise _Bad("invalid_request", f"line must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise _Bad("missing_required_parameter" if cid is None else "invalid_value",
                   "custom_id: must be a non-empty string")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Bad("invalid_value", f"method: only POST is supported, got {method!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Bad("missing_required_parameter", "body: must be an object")
    url = obj.get("url")
    if url is None:
        url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if url not in OPENAI_URLS:
        raise _Bad("invalid_url", f"url: {url!r} is not supported; use one of {sorted(OPENAI_URLS)}")
    endpoint = OPENAI_URLS[url]
    n = body.get("n", 1)
    if n not in (1, None):
        raise _Bad("invalid_value", f"body.n: only n=1 is supported, got {n!r}")
    over = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "stop") if k in body}
    for k in ("max_completion_tokens", "max_tokens"):
        if body.get(k) is not None:
            over["max_new_tokens"] = body[k]
            mt_name = k
            break
    else:
        mt_name = "max_tokens"
    try:
        sampling = _check_sampling(over, defaults, prefix="body.")
    except _Bad as e:
        raise _Bad(e.code, e.message.replace("body.max_new_tokens", f"body.{mt_name}")) from None
    if endpoint == "chat":
        if "messages" not in body:
            raise _Bad("missing_required_parameter", "body.messages: required for " + url)
        ids = enc.chat(_messages(body["messages"], "body.messages"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(_is_int(t) for t in p):
            vocab = getattr(enc.tok, "vocab_size", None)
            if any(t < 0 or (vocab is not None and t >= vocab) for t in p):
                raise _Bad("invalid_value", f"body.prompt: token ids must be in [0, {vocab})")
            ids = [int(t) for t in p]  # a prompt given as token ids is used as is
        elif isinstance(p, str):
            ids = enc.prompt(p)
        elif "prompt" not in body:
            raise _Bad("missing_required_parameter", "body.prompt: required for " + url)
        else:
            raise _Bad("invalid_value", "body.prompt: must be a string (or one string, or a list "
                                        "of token ids)")
    enc.check(ids, sampling["max_new_tokens"])
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return Request(line=line, key=id_key(cid), id=cid, prompt_ids=ids, sampling=sampling,
                   endpoint=endpoint, model=model)


def parse_input(lines: Sequence[str], fmt: str, enc: PromptEncoder,
                defaults: dict[str, Any]) -> ParsedInput:
    """Parse every line: valid requests (first occurrence of an id wins) and per-line errors."""
    if fmt == "auto":
        fmt = detect_format(lines)
    if fmt not in ("native", "openai"):
        raise JobError(f"job.format: must be auto, native or openai, got {fmt!r}")
    parse = _parse_openai if fmt == "openai" else _parse_native
    out = ParsedInput(format=fmt)
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        out.lines += 1
        rid: Any = None
        err_key: str | None = None
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if fmt == "openai":
                    err_key = "line:" + str(i)
                raise _Bad("invalid_json_line", f"not valid JSON ({e.msg} at column {e.colno})") \
                    from None
            if isinstance(obj, dict):
                rid = obj.get("custom_id" if fmt == "openai" else "id")
                if fmt == "openai":
                    err_key = (id_key(rid) if isinstance(rid, str) and rid
                               else "line:" + str(i))
            elif fmt == "openai":
                err_key = "line:" + str(i)
            req = parse(obj, i, enc, defaults)
            if req.key in seen:
                err_key = None  # keep one output line per custom_id: the first one's
                raise _Bad("duplicate_id" if fmt == "native" else "duplicate_custom_id",
                           f"{'custom_id' if fmt == 'openai' else 'id'} {req.id!r} already "
                           f"used on line {seen[req.key]}")
            seen[req.key] = i
            out.requests.append(req)
        except _Bad as e:
            if fmt == "openai" and err_key is not None and err_key in seen:
                err_key = None
            if err_key is not None and not err_key.startswith("line:"):
                seen.setdefault(err_key, i)
            out.errors.append(LineError(line=i, id=rid if _json_safe(rid) else None, code=e.code,
                                        message=e.message, raw=text[:MAX_RAW], key=err_key))
    return out


def _json_safe(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


# ---- output -----------------------------------------------------------------------------
def output_key(rec: Any, fmt: str) -> str | None:
    """Identity of an output line (the same as the Request/LineError key), None if unknown."""
    if not isinstance(rec, dict):
        return None
    if fmt == "openai":
        cid = rec.get("custom_id")
        if isinstance(cid, str) and cid:
            return id_key(cid)
        rid = rec.get("id")
        if isinstance(rid, str) and rid.startswith("batch_req_line"):
            return "line:" + rid[len("batch_req_line"):]
        return None
    return id_key(rec["id"]) if "id" in rec else None


def scan_output(fd: int, fmt: str) -> tuple[set[str], int]:
    """Identities already in the output open at fd; cut a truncated last line off the file.

    Returns (keys, number of complete records).
    """
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("output: dropping a truncated last line (%d bytes) left by an interrupted run",
                    len(data) - end)
        os.ftruncate(fd, end)
        os.fsync(fd)
    keys: set[str] = set()
    n = 0
    for j, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("output line %d is not valid JSON; ignored", j)
            continue
        k = output_key(rec, fmt)
        if k is not None:
            keys.add(k)
            n += 1
    return keys, n


def _append(fd: int, records: list[dict]) -> None:
    if not records:
        return
    buf = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    view = memoryview(buf)
    while view:
        k = os.write(fd, view)
        view = view[k:]
    os.fsync(fd)


def native_record(req: Request, res: Any, prompt_tokens: int) -> dict:
    ids = [int(t) for t in res.token_ids]
    return {
        "id": req.id,
        "text": res.text,
        "token_ids": ids,
        "finish_reason": res.finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids)},
    }


def openai_record(req: Request, res: Any, prompt_tokens: int, model_name: str,
                  created: int) -> dict:
    h = _req_hash("req", req.id)
    n_out = len(res.token_ids)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out,
             "total_tokens": prompt_tokens + n_out}
    model = req.model or model_name
    if req.endpoint == "chat":
        body = {
            "id": "chatcmpl-" + h,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": res.text},
                "logprobs": None,
                "finish_reason": res.finish_reason,
            }],
            "usage": usage,
        }
    else:
        body = {
            "id": "cmpl-" + h,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": res.text,
                "logprobs": None,
                "finish_reason": res.finish_reason,
            }],
            "usage": usage,
        }
    return {
        "id": "batch_req_" + h,
        "custom_id": req.id,
        "response": {"status_code": 200, "request_id": _req_hash("rid", req.id), "body": body},
        "error": None,
    }


def openai_error_record(err: LineError) -> dict:
    assert err.key is not None
    if err.key.startswith("line:"):
        rid, cid = "batch_req_line" + err.key[5:], None
    else:
        rid, cid = "batch_req_" + _req_hash("req", err.id), err.id
    return {"id": rid, "custom_id": cid, "response": None,
            "error": {"code": err.code, "message": f"line {err.line}: {err.message}"}}


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_errors(path: Path, errors: list[LineError]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for e in errors:
            f.write(json.dumps({"line": e.line, "id": e.id, "code": e.code, "reason": e.message,
                                "raw": e.raw}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_expert_load(expert_load: dict[Any, Sequence[float]], path: Path,
                     title: str = "expert load", mtp_layers: Sequence[int] = ()) -> Path | None:
    """Heatmap (MoE layers x global experts) of tokens routed; None when there is no data."""
    rows = sorted(((int(k), list(v)) for k, v in expert_load.items() if len(v)),
                  key=lambda kv: kv[0])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(v) for _, v in rows)
    grid = np.zeros((len(rows), width))
    for r, (_, v) in enumerate(rows):
        grid[r, : len(v)] = v
    fig_w = min(4 + width / 12, 24)
    fig_h = min(2 + len(rows) / 4, 18)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert (global id)")
    ax.set_ylabel("layer")
    step = max(1, len(rows) // 20)
    ax.set_yticks(range(0, len(rows), step))
    mtp = {int(x) for x in mtp_layers}
    ax.set_yticklabels([f"{rows[i][0]} (MTP)" if rows[i][0] in mtp else str(rows[i][0])
                        for i in range(0, len(rows), step)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="tokens routed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def _stats(engine: Any) -> dict:
    fn = getattr(engine, "stats", None)
    if fn is None:
        return {}
    try:
        s = fn() or {}
    except Exception as e:  # stats are a report, not the job
        log.warning("engine.stats() failed: %s", e)
        return {}
    return s


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
    defaults = {"max_new_tokens": 64, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "seed": 0,
                "stop": None}
    defaults.update(sampling or {})
    defaults = _check_sampling({}, defaults)
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
    parsed = parse_input(lines, fmt, enc, defaults)
    fmt = parsed.format
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
            _append(fd, [openai_error_record(e) for e in parsed.errors
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
                    pt = res.prompt_tokens if _is_int(getattr(res, "prompt_tokens", None)) \
                        else len(req.prompt_ids)
                    if fmt == "openai":
                        records.append(openai_record(req, res, pt, model_name, created))
                    else:
                        records.append(native_record(req, res, pt))
                    counts[res.finish_reason] = counts.get(res.finish_reason, 0) + 1
                    prompt_tokens += pt
                    completion_tokens += len(res.token_ids)
                    generated += 1
                _append(fd, records)
                done.update(r.key for r in batch)
                bar.update(len(records))
                if gen_seconds > 0:
                    bar.set_postfix(tok_s=f"{completion_tokens / gen_seconds:.1f}",
                                    seq_s=f"{generated / gen_seconds:.2f}", refresh=False)
        finally:
            bar.close()
        _, n_records = scan_output(fd, fmt)

    stats = _stats(engine)
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
    _write_json_atomic(sum_path, summary)
    summary["summary"] = str(sum_path)
    return summary
