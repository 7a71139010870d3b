"""`python -m ds3dist.checkpoint.inspect DIR`: print a checkpoint summary, then its problems.

Exit status: 0 valid, 1 invalid (problems printed), 2 unusable input (no such directory).
Reads only config.json, the index and the shard headers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds3dist.checkpoint.summary import format_summary, summary
from ds3dist.checkpoint.validation import validate
from ds3dist.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds3dist.checkpoint.inspect",
                                 description="Summarize and validate a checkpoint directory.")
    ap.add_argument("path", help="checkpoint directory")
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
    if not problems:
        print("valid: no problems")
        return 0
    print(f"INVALID: {len(problems)} problem(s)")
    for p in problems:
        print(f"  {p}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
