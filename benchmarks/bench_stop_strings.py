"""Host time of the stop-string check per token, early and late in a long output.

    python benchmarks/bench_stop_strings.py [--tokens 4096] [--repeats 5]

One request's output of --tokens tokens (natural text in several scripts, encoded with the
bundled release tokenizer and repeated) is fed token by token to ds3dist.text.StopStrings
with stop strings that never match; each feed is timed. Printed: the median time per token
in a window of 101 tokens around token 100 and around token 4000, and their ratio, beside
the same figures for re-decoding the whole output on every token (what the scheduler did
before stop strings moved to the output edge). The fastest of --repeats passes is taken per
token. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ds3dist.checkpoint.synthesize import synthesize
from ds3dist.jobs.schema import cached_checkpoint_dir
from ds3dist.text import StopStrings
from ds3dist.tokenizer import load_tokenizer

TEXT = ("The sea was calm that night; Héllo wörld 🙂 日本語のテキスト, and more: ünïcödé. "
        "Numbers 12345 and code `x = f(y)` follow. ")
STOPS = ["\x00never", "END OF STORY"]


def outputs(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def incremental(tok, ids: list[int]) -> list[float]:
    check, out = StopStrings(tok, STOPS), []
    for t in ids:
        t0 = time.perf_counter()
        hit = check.feed([t])
        out.append(time.perf_counter() - t0)
        assert hit is None
    return out


def full_decode(tok, ids: list[int]) -> list[float]:
    out = []
    for n in range(1, len(ids) + 1):
        t0 = time.perf_counter()
        text = tok.decode(ids[:n])
        found = any(s in text for s in STOPS)
        out.append(time.perf_counter() - t0)
        assert not found
    return out


def around(times: list[float], at: int, half: int = 50) -> float:
    return statistics.median(times[max(0, at - half):at + half + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ckpt = cached_checkpoint_dir("tiny")
    if not (ckpt / "tokenizer.json").exists():
        synthesize(ckpt, preset="tiny", seed=0)
    tok = load_tokenizer(ckpt)
    ids = outputs(tok, args.tokens)
    late = min(4000, args.tokens - 51)
    print(f"{args.tokens} output tokens, {len(tok.decode(ids))} characters; stop strings "
          f"{STOPS!r} (never found); fastest of {args.repeats} passes per token")
    print(f"{'check':26} {'us/token @100':>14} {f'us/token @{late}':>15} {'ratio':>6}")
    for name, fn in (("incremental (StopStrings)", incremental), ("decode everything", full_decode)):
        passes = [fn(tok, ids) for _ in range(args.repeats)]
        best = [min(col) for col in zip(*passes)]
        a, b = around(best, 100), around(best, late)
        print(f"{name:26} {1e6 * a:14.2f} {1e6 * b:15.2f} {b / a:6.2f}", flush=True)


if __name__ == "__main__":
    main()
