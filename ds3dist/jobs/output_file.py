"""The job's output file: locked for the whole job, appended to, and scanned on resume.

`OutputFile.open(path)` checks the path (not a directory, its folder creatable, the file
writable) and takes an exclusive lock before anything is written, so a second job on the same
output is refused at once and changes nothing. `scan()` finds the requests an earlier run
already wrote (cutting off a truncated last line left by a kill); `append()` writes records
as JSON lines at once and fsyncs at least every `SYNC_S` seconds (and at `sync()`/`close()`). A failed write (full disk, permissions) is cut back to the last
complete line and raised as a `JobError` that says how many lines are safely on disk.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ds3dist.jobs.errors import JobError

log = logging.getLogger(__name__)
SYNC_S = 2.0  # longest a written line waits for its fsync


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


class OutputFile:
    def __init__(self, path: Path, fd: int, key: str):
        self.path = path
        self.fd = fd
        self.key = key
        self.records = 0  # complete records written (known after scan)
        self._synced = time.monotonic()

    @classmethod
    def open(cls, path: str | Path, key: str = "job.output") -> "OutputFile":
        path = Path(path)
        if path.is_dir():
            raise JobError(f"{key}: {path} is a directory; name a file, e.g. "
                           f"{key}={path / 'results.jsonl'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobError(f"{key}: cannot create the folder {path.parent}: {e.strerror}") from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise JobError(f"{key}: cannot open {path} for writing: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobError(f"{key}: {path} is being written by another job that is still "
                           f"running; wait for it or choose another {key}") from None
        return cls(path, fd, key)

    def scan(self, key_of: Callable[[Any], str | None]) -> set[str]:
        """Identities (key_of(record)) already in the file; a truncated last line is cut off."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        end = data.rfind(b"\n") + 1
        keys: set[str] = set()
        self.records = 0
        for j, raw in enumerate(data[:end].split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                log.warning("%s: line %d is not valid JSON; ignored", self.path, j)
                continue
            k = key_of(rec)
            if k is not None:
                keys.add(k)
                self.records += 1
        if end < len(data):
            log.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted "
                        "run", self.path, len(data) - end)
            self._guard(lambda: (os.ftruncate(self.fd, end), os.fsync(self.fd)))
        return keys

    def append(self, records: list[dict]) -> None:
        """Append records as JSON lines with one write."""
        if not records:
            return
        view = memoryview(jsonl(records).encode())
        start = os.fstat(self.fd).st_size

        def write() -> None:
            v = view
            while v:
                v = v[os.write(self.fd, v):]

        self._guard(write, start)
        self.records += len(records)
        if time.monotonic() - self._synced >= SYNC_S:
            self.sync()

    def sync(self) -> None:
        """fsync what was written."""
        self._guard(lambda: os.fsync(self.fd))
        self._synced = time.monotonic()

    def _guard(self, fn: Callable[[], Any], restore_size: int | None = None) -> None:
        try:
            fn()
        except OSError as e:
            if restore_size is not None:
                try:  # never leave half a line behind
                    os.ftruncate(self.fd, restore_size)
                except OSError:
                    pass
            raise JobError(f"{self.key}: cannot write {self.path}: {e.strerror}; "
                           f"{self.records} lines are safely on disk; rerun the same command "
                           f"to resume") from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError:  # reported by the write or sync that failed
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
