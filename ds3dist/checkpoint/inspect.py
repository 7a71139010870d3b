"""`python -m ds3dist.checkpoint.inspect [--verify] DIR`: a checkpoint summary, then its problems.

Exit status: 0 valid, 1 invalid (problems printed), 2 unusable input (no such directory).
Without --verify it reads only config.json, the index and the shard headers; --verify then
streams every byte (`ds3dist.checkpoint.verify`): SHA256SUMS digests, NaN/Inf weights, bad scales.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds3dist.checkpoint.summary import format_summary, summary
from ds3dist.checkpoint.validation import Problem, validate
from ds3dist.checkpoint.verify import verify
from ds3dist.config import ConfigError


def _report(what: str, problems: list[Problem]) -> None:
    if not problems:
        print(f"{what}: valid, no problems")
        return
    print(f"{what}: INVALID, {len(problems)} problem(s)")
    for p in problems:
        print(f"  {p}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds3dist.checkpoint.inspect",
                                 description="Summarize and validate a checkpoint directory.")
    ap.add_argument("path", help="checkpoint directory")
    ap.add_argument("--verify", action="store_true",
                    help="also read every byte: SHA256SUMS digests, NaN/Inf weights, bad scales")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    path = Path(a.path)
    if not path.is_dir():
        print(f"error: {path}: no such checkpoint directory", file=sys.stderr)
        return 2
    try:
        print(format_summary(summary(path)))
    except ConfigError as e:
        print(f"summary unavailable: {e}")
    problems = validate(path)
    _report("headers", problems)
    if a.verify:
        data = verify(path, progress=not a.no_progress, note=lambda s: print(f"note: {s}"))
        _report("data", data)
        problems += data
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
