"""Stopping a job on SIGTERM or SIGINT, within a bounded time, leaving it resumable.

Before generation begins (preflight, op builds, joining the cluster, placing and loading the
ranks) a signal raises `Interrupted` at once: there is nothing to drain. During generation the
first signal asks the job to stop: no request is admitted any more, the requests in flight may
finish (their lines are written) for up to `drain_s` seconds, then the job ends with what it
has; every line written stays valid and a rerun does the rest. Once nothing is in flight
(`drained`) the drain timer is off, so the closing work (stats, summary, plot) is never cut by
it. A second signal, or the drain running past `drain_s`, raises `Interrupted` in the main
thread at once. The launch exits with EXIT_INTERRUPTED whenever a job ended before all its
requests did, 0 when every request of the input was written.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped early; rerun the same command to finish
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The job stopped at once: a second signal, or the drain took too long."""


class GracefulStop:
    """The job's signal handlers while it runs (a context manager; main thread only)."""

    def __init__(self, drain_s: float = 20.0):
        self.drain_s = drain_s
        self.signal: str | None = None  # the first signal's name
        self._event = threading.Event()
        self._expired = False
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}
        self.generating = False  # set by the job when generation begins (see the module doc)
        self._drained = False
        self._why: str | None = None  # the Interrupted raised, in case a library re-raises it bare

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:  # as a should_stop callable
        return self.requested

    def __enter__(self) -> GracefulStop:
        return self.arm()

    def arm(self) -> GracefulStop:
        """Install the handlers (again: `ray.init` installs its own SIGTERM handler). Off the
        main thread, where Python allows no handlers, it does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)
        return self

    def __exit__(self, *exc) -> None:
        self.drained()
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def interruption(self, e: KeyboardInterrupt) -> KeyboardInterrupt:
        """e, or the Interrupted this stop raised when a library re-raised it bare (Ray turns
        an exception raised in a signal handler during its waits into a plain
        KeyboardInterrupt)."""
        return Interrupted(self._why) if self._why and not str(e) else e

    def drained(self) -> None:
        """Nothing is in flight any more (all finished, or the stream ended): the drain timer
        is off; a second signal still stops at once."""
        self._drained = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.generating:
            self.signal = name
            self._event.set()
            self._why = f"stopped by {name} before generation began; nothing was written"
            raise Interrupted(self._why)
        if self.requested:
            why = (f"the requests in flight did not finish within {self.drain_s:g} s "
                   f"(runtime.drain_timeout_s)" if self._expired else f"{name} while stopping")
            self._why = f"stopped at once after {self.signal}: {why}"
            raise Interrupted(self._why)
        self.signal = name
        self._event.set()
        if self._drained:  # generation is over: only the closing work is left
            print(f"\n{name}: the requests have ended; finishing the summary (a second signal "
                  f"stops at once)", file=sys.stderr, flush=True)
            return
        print(f"\n{name}: stopping: no new requests; those in flight may finish for up to "
              f"{self.drain_s:g} s (a second signal stops at once); rerun the same command to "
              f"finish the job", file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.drain_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        if self._timer is None:  # drained meanwhile
            return
        self._expired = True  # a real signal to the main thread: it wakes a blocking call too
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
