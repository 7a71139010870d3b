"""The output side of a batch job: result records, the output file, the errors file.

native  one line per request: `{"id", "text", "token_ids", "finish_reason", "usage":
        {"prompt_tokens", "completion_tokens"}}`. A malformed input line goes only to the
        errors file.
openai  the OpenAI batch-output format: `{"id", "custom_id", "response": {"status_code": 200,
        "request_id", "body": <chat.completion or text_completion>}, "error": null}`; a
        malformed request gets an output line with `"response": null, "error": {"code",
        "message"}` (and an errors-file entry).

The output file itself (lock, append, resume scan) is `ds3dist.jobs.output_file`. Whole files
(the errors file, the job summary) are replaced atomically (`write_atomic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ds3dist.jobs.errors import JobError
from ds3dist.jobs.output_file import jsonl
from ds3dist.jobs.requests import LineError, InputLine, id_key


def _req_hash(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]


def output_key(rec: Any, fmt: str) -> str | None:
    """Identity of an output line (the same as the InputLine/LineError key), None if unknown."""
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


def native_record(req: InputLine, res: Any, prompt_tokens: int) -> dict:
    ids = [int(t) for t in res.token_ids]
    return {
        "id": req.id,
        "text": res.text,
        "token_ids": ids,
        "finish_reason": res.finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids)},
    }


def openai_record(req: InputLine, res: Any, prompt_tokens: int, model_name: str,
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


def write_atomic(path: Path, text: str, key: str) -> None:
    """Replace the file at path with text (a temporary file beside it, fsync'd, renamed);
    JobError naming `key` and `path` if that fails (the old file is then left as it was)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise JobError(f"{key}: cannot write {path}: {e.strerror}") from None


def _error_rows(errors: list[LineError]) -> str:
    return jsonl([{"line": e.line, "id": e.id, "code": e.code, "reason": e.message,
                   "raw": e.raw} for e in errors])


def record_errors(path: Path, errors: list[LineError]) -> None:
    """Add this run's malformed input lines to the errors file, keeping what earlier runs of
    the job recorded there; a record already in the file is not added again (a rerun meets
    the same bad lines). A line a kill left unfinished is dropped."""
    old: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                json.loads(raw)
                old.append(raw)
    seen = set(old)
    new = [r for r in _error_rows(errors).splitlines() if r not in seen]
    write_atomic(path, "".join(f"{r}\n" for r in old + new), "job.errors")


def append_errors(path: Path, errors: list[LineError]) -> None:
    """Requests that failed in the engine, added as they fail (fsync'd)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(_error_rows(errors))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise JobError(f"job.errors: cannot write {path}: {e.strerror}") from None
