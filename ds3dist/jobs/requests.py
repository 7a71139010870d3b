"""The input side of a batch job: JSONL lines parsed into validated, tokenized requests.

Two input formats, detected per file (`detect_format`) from the first JSON object line:

native  `{"id": 7, "prompt": "..."}` or `{"id": "a", "messages": [{"role": ..., "content": ...}]}`
        with optional per-line sampling keys (max_new_tokens, temperature, top_p, top_k, seed,
        stop).
openai  the OpenAI batch-file format, `{"custom_id", "method": "POST", "url":
        "/v1/chat/completions" | "/v1/completions", "body": {"messages" | "prompt",
        "max_tokens", "temperature", "top_p", "seed", "stop", ...}}`.

`parse_input` turns every non-blank line into either a `InputLine` (prompt token ids, merged
sampling parameters, the identity used for resume and duplicate detection) or a `LineError`
(an OpenAI-style error code and a message naming the offending field). `PromptEncoder` does
the tokenizing and the length checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ds3dist.core.params import SAMPLING_KEYS, Sampling, SamplingError, SamplingParams
from ds3dist.text import encode_prompt

# the job's sampling defaults (the launch's sampling.* keys default to these)
DEFAULT_SAMPLING = Sampling(SamplingParams(temperature=0.6, top_p=0.95, top_k=0, seed=0),
                            max_new_tokens=64)
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
MAX_RAW = 300  # characters of an offending line kept in the errors file


class _Bad(Exception):
    """A line is not a valid request: an OpenAI-style error code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InputLine:
    line: int  # 1-based line number in the input
    key: str  # identity for resume / duplicates: JSON of the id (native) or custom_id (openai)
    id: Any  # the native id or the OpenAI custom_id, as given
    prompt_ids: list[int]
    sampling: Sampling
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
    requests: list[InputLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    lines: int = 0  # non-blank lines


def id_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sampling(over: dict[str, Any], defaults: Sampling, prefix: str = "",
              names: dict[str, str] | None = None) -> Sampling:
    """The defaults with a line's overrides (checked by Sampling.overridden); _Bad names a
    bad key as the line spelt it (names: our key -> the line's, e.g. max_new_tokens ->
    max_tokens)."""
    try:
        return defaults.overridden(over)
    except SamplingError as e:
        raise _Bad("invalid_value", f"{prefix}{(names or {}).get(e.key, e.key)}: {e.problem}") \
            from None


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

    Text is encoded exactly as `ds3dist.local` encodes a string prompt (BOS prepended
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


# ---- lines ------------------------------------------------------------------------------
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


def _parse_native(obj: Any, line: int, enc: PromptEncoder, defaults: Sampling) -> InputLine:
    if not isinstance(obj, dict):
        raise _Bad("invalid_request", f"line must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise _Bad("missing_required_parameter", "missing id")
    rid = obj["id"]
    if not (isinstance(rid, str) and rid) and not is_int(rid):
        raise _Bad("invalid_value", f"id: must be a non-empty string or an integer, got {rid!r}")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise _Bad("missing_required_parameter" if not has_p else "invalid_request",
                   "needs exactly one of prompt or messages")
    over = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    mt_name = "max_new_tokens"
    if "max_tokens" in obj and "max_new_tokens" not in obj:
        over["max_new_tokens"], mt_name = obj["max_tokens"], "max_tokens"
    sampling = _sampling(over, defaults, names={"max_new_tokens": mt_name})
    if has_p:
        if not isinstance(obj["prompt"], str):
            raise _Bad("invalid_value", f"prompt: must be a string, got "
                                        f"{type(obj['prompt']).__name__}")
        ids = enc.prompt(obj["prompt"])
    else:
        ids = enc.chat(_messages(obj["messages"], "messages"))
    enc.check(ids, sampling.max_new_tokens)
    return InputLine(line=line, key=id_key(rid), id=rid, prompt_ids=ids, sampling=sampling)


def _parse_openai(obj: Any, line: int, enc: PromptEncoder, defaults: Sampling) -> InputLine:
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
    sampling = _sampling(over, defaults, prefix="body.", names={"max_new_tokens": mt_name})
    if endpoint == "chat":
        if "messages" not in body:
            raise _Bad("missing_required_parameter", "body.messages: required for " + url)
        ids = enc.chat(_messages(body["messages"], "body.messages"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(is_int(t) for t in p):
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
    enc.check(ids, sampling.max_new_tokens)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return InputLine(line=line, key=id_key(cid), id=cid, prompt_ids=ids, sampling=sampling,
                   endpoint=endpoint, model=model)


def parse_input(lines: Sequence[str], fmt: str, enc: PromptEncoder,
                defaults: Sampling, bad_lines: dict[int, str] | None = None) -> ParsedInput:
    """Parse every line: valid requests (first occurrence of an id wins) and per-line errors.

    fmt is 'native' or 'openai' (the caller resolves 'auto' with `detect_format`); bad_lines:
    1-based line -> why it could not be decoded (`ds3dist.jobs.input_text`).
    """
    parse = _parse_openai if fmt == "openai" else _parse_native
    bad_lines = bad_lines or {}
    out = ParsedInput()
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text and i not in bad_lines:
            continue
        out.lines += 1
        rid: Any = None
        err_key: str | None = None
        try:
            if i in bad_lines:
                err_key = "line:" + str(i) if fmt == "openai" else None
                raise _Bad("invalid_encoding", bad_lines[i])
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
