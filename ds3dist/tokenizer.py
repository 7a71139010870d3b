"""The release tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json).

`load_tokenizer(checkpoint_dir)` returns a `Tokenizer` with `encode`, `decode`,
`apply_chat_template` (the chat template of tokenizer_config.json rendered with jinja2 the way
HF transformers renders it: a sandboxed environment with trim_blocks/lstrip_blocks, the special
tokens bos_token/eos_token/... filled in as strings), `bos_token_id`, `eos_token_id` and
`vocab_size` (the tokenizer's, 128815 for the release; the model's embedding has 129280 rows).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(FileNotFoundError):
    """Tokenizer files are missing or unreadable; the message names the file."""


def _token_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class Tokenizer:
    def __init__(self, tokenizer, config: dict[str, Any], source: str = ""):
        self._tok = tokenizer
        self.config = config
        self.source = source
        self.special_tokens = {k: _token_str(config.get(k)) for k in _SPECIAL}
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = self.special_tokens["bos_token"]
        self.eos_token = self.special_tokens["eos_token"]
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.eos_token_id = self._id_of(self.eos_token, "eos_token")

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: {what} {token!r} is not in {TOKENIZER_JSON}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @cached_property
    def _template(self):
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: {TOKENIZER_CONFIG} has no chat_template")
        return _compile(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation as text (what HF's apply_chat_template(tokenize=False) gives)."""
        values = {k: v for k, v in self.special_tokens.items() if v is not None}
        values.update(kwargs)
        return self._template.render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **values)


def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """Load tokenizer.json and tokenizer_config.json from a checkpoint directory."""
    d = Path(checkpoint_dir)
    tj, tc = d / TOKENIZER_JSON, d / TOKENIZER_CONFIG
    for p in (tj, tc):
        if not p.is_file():
            raise TokenizerError(f"{p}: tokenizer file is missing")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise TokenizerError(f"{tj}: cannot load tokenizer ({e})") from None
    try:
        config = json.loads(tc.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{tc}: not valid JSON ({e})") from None
    return Tokenizer(tok, config, source=str(d))
