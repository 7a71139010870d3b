"""Checks a launch makes before any Ray cluster starts, each failing with a message that names
the setting at fault.

- `check_side_files`: the errors, summary and plot files can be written (not a directory, a
  writable folder) without writing them yet.
- `check_checkpoint`: the header-only validation of the checkpoint against its config (seconds
  even for the 163-shard release) and, when asked, the streaming integrity check.

The input (`ds3dist.jobs.input_text.read_input`), the output lock
(`ds3dist.jobs.output_file.OutputFile.open`) and the Ray address
(`ds3dist.runtime.cluster.check_address`) are the other checks; the launch runs them all in
order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ds3dist.checkpoint.validation import validate
from ds3dist.checkpoint.verify import verify as verify_data
from ds3dist.jobs.errors import JobError
from ds3dist.jobs.schema import LaunchConfigError

MAX_LISTED = 10  # checkpoint problems quoted in the error; inspect lists them all


def check_side_files(paths: dict[str, Path]) -> None:
    """paths: setting -> file. Each must not be a directory and its folder must take a file."""
    for key, path in paths.items():
        if path.is_dir():
            raise JobError(f"{key}: {path} is a directory; name a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe"):
                pass
        except OSError as e:
            raise JobError(f"{key}: cannot write in {path.parent}: {e.strerror}") from None


def check_checkpoint(path: Path, verify: bool = False, progress: bool = True) -> None:
    """Header-only validation (and with verify, checksums and values); LaunchConfigError
    listing the problems, each naming file and tensor."""
    problems = validate(path)
    if verify and not problems:
        problems = verify_data(path, progress=progress)
    if not problems:
        return
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise LaunchConfigError(
        f"model.path: the checkpoint in {path} is invalid ({len(problems)} problem(s)):\n"
        f"{listed}{more}\nlist them all with: python -m ds3dist.checkpoint.inspect "
        f"{'--verify ' if verify else ''}{path}")
