"""Reading a JSONL input file as text lines.

JSONL separates records with "\\n" only, so lines are split on "\\n" (a trailing "\\r" is
dropped), never on the other Unicode line breaks (U+2028, U+0085, ...) that a JSON string may
hold unescaped. The encoding is UTF-8; a byte-order mark (UTF-8, UTF-16, UTF-32) or a UTF-16/32
file without one (`json.detect_encoding`) is decoded and named. A file that is not text at all
(NUL bytes, or most lines undecodable or full of control characters) is one `JobError`; a few
undecodable lines in a text file are per-line errors (`InputText.bad_lines`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ds3dist.jobs.errors import JobError

# Control characters JSON never allows unescaped (whitespace \t \n \r is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass
class InputText:
    path: Path
    lines: list[str]  # line i + 1 of the file; an undecodable line is ""
    encoding: str  # "utf-8", "utf-8-sig", "utf-16-le", ...
    bad_lines: dict[int, str] = field(default_factory=dict)  # 1-based line -> reason

    @property
    def nonblank(self) -> int:
        return sum(1 for i, x in enumerate(self.lines, 1) if x.strip() or i in self.bad_lines)


def read_input(path: str | Path, key: str = "job.input") -> InputText:
    """Read and decode the input file; JobError naming `key` and the file if it is no text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise JobError(f"{key}: {path} is a directory, not a JSONL file") from None
    except OSError as e:
        raise JobError(f"{key}: cannot read {path}: {e.strerror}") from None
    encoding = json.detect_encoding(data) if data else "utf-8"
    if encoding in ("utf-8", "utf-8-sig"):
        nul = data.find(b"\x00")
        if nul >= 0:
            raise JobError(f"{key}: {path} is not a text file (NUL byte at offset {nul}); "
                           f"expected UTF-8 JSONL")
        lines, bad = _decode_lines(data, encoding)
    else:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            raise JobError(f"{key}: {path} looks like {encoding} text but does not decode as it "
                           f"(byte {e.start}); expected UTF-8 JSONL") from None
        lines, bad = _split(text), {}
    result = InputText(path, lines, encoding, bad)
    _refuse_binary(result, key)
    return result


def _split(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [x[:-1] if x.endswith("\r") else x for x in lines]


def _decode_lines(data: bytes, encoding: str) -> tuple[list[str], dict[int, str]]:
    if encoding == "utf-8-sig":
        data = data[3:]
    lines: list[str] = []
    bad: dict[int, str] = {}
    for i, raw in enumerate(_split_bytes(data), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append("")
            bad[i] = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
    return lines, bad


def _split_bytes(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [x[:-1] if x.endswith(b"\r") else x for x in lines]


def _refuse_binary(inp: InputText, key: str) -> None:
    """One error for a file that is not text: most non-blank lines undecodable or holding
    control characters (a NUL among them) that JSON never allows."""
    garbage = [i for i, x in enumerate(inp.lines, 1) if i in inp.bad_lines or _CONTROL.search(x)]
    n = inp.nonblank
    if garbage and (2 * len(garbage) > n or any("\x00" in inp.lines[i - 1] for i in garbage)):
        first = garbage[0]
        why = inp.bad_lines.get(first) or "holds control characters"
        raise JobError(f"{key}: {inp.path} is not a text file ({len(garbage)} of {n} lines are "
                       f"not text as {inp.encoding}; first: line {first}, {why}); expected "
                       f"UTF-8 JSONL")
