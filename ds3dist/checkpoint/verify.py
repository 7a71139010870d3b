"""Streaming integrity check of a checkpoint's bytes: SHA256SUMS digests and tensor values.

`verify(path)` reads every shard of the index (and every other file SHA256SUMS lists) once,
in element-aligned chunks of at most `chunk` bytes through two reused buffers, so memory stays
bounded whatever the shard size. It
  - compares each listed file's sha256 with the manifest `SHA256SUMS` (`sha256sum` output
    format: `<64 hex>  <name>` or `<64 hex> *<name>`), when the directory has one;
  - finds NaN/Inf in every weight and non-finite or <= 0 values in every `*_scale_inv`, on the
    integer bit patterns of each dtype (e4m3fn has no Inf: NaN is S.1111.111).
The hash of a chunk runs in a second thread while the main thread checks its values and reads
the next one (hashlib and torch release the GIL on large buffers).

Structure (index, headers, shapes) is `validate()`'s business: here a missing shard is skipped
and a shard whose header cannot be parsed is only hashed, each with a note.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
from tqdm import tqdm

from ds3dist.checkpoint.layout import DTYPE_BYTES, SCALE_SUFFIX, ST_DTYPES
from ds3dist.checkpoint.reader import (
    CheckpointError,
    HeaderEntry,
    HeaderError,
    load_index,
    read_header,
)
from ds3dist.checkpoint.validation import Problem

MANIFEST = "SHA256SUMS"
CHUNK = 16 << 20  # bytes per read (8-64 MiB measured alike; smaller stays in cache)
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")

# safetensors dtype -> (integer view, exponent mask): non-finite when all mask bits are set;
# a positive finite value is 0 < bits < mask on the (signed, or for F8 unsigned) view.
_BITS = {"BF16": (torch.int16, 0x7F80), "F16": (torch.int16, 0x7C00),
         "F32": (torch.int32, 0x7F800000), "F8_E4M3": (torch.uint8, 0x7F)}


# ---- the manifest ------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, digests: dict[str, str]) -> None:
    """Write directory/SHA256SUMS from {file name: sha256 hex}, sorted by name."""
    lines = [f"{digests[n]}  {n}\n" for n in sorted(digests)]
    (directory / MANIFEST).write_text("".join(lines))


def read_manifest(directory: Path) -> tuple[dict[str, str] | None, list[Problem]]:
    """({file name: sha256 hex} or None when there is no manifest, its problems)."""
    mp = directory / MANIFEST
    if not mp.is_file():
        return None, []
    try:
        text = mp.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return {}, [Problem("manifest", MANIFEST, None, f"unreadable ({e})")]
    digests: dict[str, str] = {}
    problems = []
    for no, line in enumerate(text.splitlines(), start=1):
        m = _LINE.fullmatch(line)
        if m is None:
            problems.append(Problem("manifest", MANIFEST, None, f"line {no} is not in sha256sum "
                                    f"format '<64 hex>  <name>': {line[:100]!r}"))
            continue
        name = str(PurePosixPath(m.group(2)))  # ./a -> a
        if name != MANIFEST:  # `sha256sum * > SHA256SUMS` run twice lists the manifest itself
            digests[name] = m.group(1).lower()
    return digests, problems


# ---- value checks ------------------------------------------------------------------------
class _ShardValues:
    """Value checks of one shard, fed element-aligned pieces of its bytes in file order."""

    def __init__(self, shard: str, entries: list[HeaderEntry], data_start: int,
                 scratch: torch.Tensor):
        self.shard = shard
        self.spans = [(data_start + e.start, data_start + e.end, e) for e in entries]
        self.i = 0  # first span not yet fully fed
        self.scratch = scratch
        self.bad: dict[str, list] = {}  # tensor -> [count, first flat index, first bad value]

    def feed(self, c0: int, buf: memoryview) -> None:
        c1 = c0 + len(buf)
        while self.i < len(self.spans):
            s0, s1, e = self.spans[self.i]
            if s0 >= c1:
                return
            a, b = max(s0, c0), min(s1, c1)
            if b > a:
                self._check(e, (a - s0) // DTYPE_BYTES[e.dtype], buf[a - c0:b - c0])
            if s1 > c1:
                return
            self.i += 1

    def _check(self, e: HeaderEntry, first: int, piece: memoryview) -> None:
        view, mask = _BITS[e.dtype]
        x = torch.frombuffer(piece, dtype=view)
        if e.name.endswith(SCALE_SUFFIX):  # scales are small: one exact pass
            bad = (x <= 0) | (x >= mask)
        else:  # fast path: max(bits & mask) == mask only when some value is non-finite
            masked = torch.bitwise_and(x, mask, out=self.scratch[:len(piece)].view(view))
            if int(masked.max()) != mask:
                return
            bad = masked == mask
        count = int(bad.sum())
        if count:
            k = int(bad.view(torch.uint8).argmax())  # the first True
            value = float(x[k:k + 1].view(ST_DTYPES[e.dtype]).float())
            rec = self.bad.setdefault(e.name, [0, first + k, value])
            rec[0] += count

    def problems(self) -> list[Problem]:
        out = []
        for e in (s[2] for s in self.spans):
            if e.name not in self.bad:
                continue
            count, first, value = self.bad[e.name]
            if e.name.endswith(SCALE_SUFFIX):
                out.append(Problem("bad_scale", self.shard, e.name, f"{count} of {e.numel} scale "
                                   f"values are non-finite or <= 0 (first: {value} at flat index "
                                   f"{first})"))
            else:
                what = "NaN" if e.dtype == "F8_E4M3" else "NaN/Inf"
                out.append(Problem("nonfinite", self.shard, e.name, f"{count} of {e.numel} "
                                   f"values are {what} (first: {value} at flat index {first})"))
        return out


def _chunk_ends(size: int, spans: list, chunk: int):
    """Read boundaries: at most `chunk` bytes apart, never inside a tensor's element."""
    pos, i = 0, 0
    while pos < size:
        end = min(size, pos + chunk)
        while i < len(spans) and spans[i][1] <= end:
            i += 1
        if i < len(spans) and spans[i][0] < end:  # inside span i: round down to an element
            s0, e = spans[i][0], spans[i][2]
            es = DTYPE_BYTES[e.dtype]
            end = s0 + (end - s0) // es * es
        yield end
        pos = end


# ---- streaming -----------------------------------------------------------------------------
class _Stream:
    """Reads files through two reused buffers; hashes in a worker thread, checks values here."""

    def __init__(self, chunk: int, bar: tqdm, pool: ThreadPoolExecutor):
        self.bufs = [memoryview(bytearray(chunk)), memoryview(bytearray(chunk))]
        self.scratch = torch.empty(chunk, dtype=torch.uint8)
        self.chunk, self.bar, self.pool = chunk, bar, pool

    def run(self, path: Path, hasher, values: _ShardValues | None) -> str | None:
        """Stream `path`; returns an error message if it cannot be read to its end."""
        hashing: list[Future | None] = [None, None]  # the hash of the chunk in each buffer
        spans = values.spans if values else []
        try:
            with open(path, "rb", buffering=0) as f:
                size = path.stat().st_size
                pos = 0
                for k, end in enumerate(_chunk_ends(size, spans, self.chunk)):
                    slot = k % 2
                    if hashing[slot] is not None:
                        hashing[slot].result()  # the buffer is free again
                    buf = self.bufs[slot][:end - pos]
                    got = _read_into(f, buf)
                    if got < len(buf):
                        return f"ends at byte {pos + got}, expected {size}: shrank while reading"
                    if hasher is not None:
                        hashing[slot] = self.pool.submit(hasher.update, buf)
                    if values is not None:
                        values.feed(pos, buf)
                    self.bar.update(len(buf))
                    pos = end
        except OSError as e:
            return f"read error: {e}"
        finally:
            for fut in hashing:
                if fut is not None:
                    fut.result()
        return None


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch ops on one thread: an intra-op team costs more than it gains on small ops, and
    one that shares the cores with another thread (verify's hash thread) waits at every
    barrier (measured 2-8x slower on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _read_into(f, buf: memoryview) -> int:
    n = 0
    while n < len(buf):
        r = f.readinto(buf[n:])
        if not r:
            break
        n += r
    return n


# ---- the check -------------------------------------------------------------------------------
def _plan(path: Path, digests: dict[str, str] | None, note: Callable[[str], None]):
    """[(file name, its expected sha256 or None, _ShardValues args or None)] to stream."""
    try:
        shards = list(dict.fromkeys(load_index(path)[0].values()))
    except CheckpointError as e:
        note(f"no usable index ({e}): tensor values not checked")
        shards = []
    listed = digests or {}
    plan = []
    for name in shards + sorted(n for n in listed if n not in shards):
        p = path / name
        if not p.is_file():
            if name not in listed:  # a listed one is a manifest problem already
                note(f"{name}: missing, not checked")
            continue
        layout = None
        if name in shards:
            try:
                h = read_header(p)
                layout = (sorted(h.entries.values(), key=lambda e: e.start), h.data_start)
            except HeaderError as e:
                note(f"{name}: header unreadable ({e}): tensor values not checked")
        plan.append((name, listed.get(name), layout))
    unlisted = [s for s in shards if s not in listed and (path / s).is_file()]
    if digests is not None and unlisted:
        note(f"{len(unlisted)} shard(s) not in {MANIFEST}, not checksummed (first: {unlisted[0]})")
    return plan


def verify(path: str | Path, progress: bool = True, *, chunk: int = CHUNK,
           note: Callable[[str], None] | None = None) -> list[Problem]:
    """Every data problem of the checkpoint at `path` (empty: its bytes check out).

    Streams each shard once (reads of at most `chunk` bytes); `note` receives remarks that are
    not problems (no manifest, files it could not check), all before streaming starts.
    """
    if chunk < 8:
        raise ValueError(f"chunk must be at least 8 bytes, got {chunk}")
    path = Path(path)
    if not path.is_dir():
        return [Problem("no_directory", str(path), None, "no such checkpoint directory")]
    note = note or (lambda _msg: None)
    digests, problems = read_manifest(path)
    if digests is None:
        note(f"no {MANIFEST} manifest: checksums not checked, only tensor values")
    else:
        problems += [Problem("manifest", n, None, f"listed in {MANIFEST} but missing")
                     for n in sorted(digests) if not (path / n).is_file()]
    plan = _plan(path, digests, note)
    total = sum((path / name).stat().st_size for name, _, _ in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar, \
            ThreadPoolExecutor(1) as pool, one_torch_thread():
        stream = _Stream(chunk, bar, pool)
        for name, want, layout in plan:
            values = _ShardValues(name, *layout, stream.scratch) if layout else None
            hasher = hashlib.sha256() if want else None
            error = stream.run(path / name, hasher, values)
            if error:
                problems.append(Problem("read_error", name, None, error))
            elif hasher is not None and hasher.hexdigest() != want:
                problems.append(Problem("checksum", name, None, f"sha256 is {hasher.hexdigest()}, "
                                        f"{MANIFEST} says {want}"))
            if values is not None:
                problems += values.problems()
    return problems
