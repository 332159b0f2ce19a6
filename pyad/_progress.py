"""Progress for long work: tqdm bars on a terminal; without one (a log file, a
service, CI) a plain line every ``log_every`` seconds instead, so a long fit is
never silent. Off entirely with ``pyad --quiet`` or ``pyad._progress.enabled = False``."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

enabled: bool | None = None  # None: bars on a terminal, periodic lines otherwise; False: nothing
log_every = 30.0  # seconds between plain progress lines when not on a terminal


def _terminal() -> bool:
    return sys.stderr.isatty()


def bar(iterable=None, disable: bool | None = None, **kwargs):
    """A progress bar (``disable=True``: none, e.g. a one-batch job)."""
    if disable or enabled is False:
        return tqdm(iterable, disable=True, **kwargs)
    if _terminal() or enabled is True:
        return tqdm(iterable, disable=False, leave=False, **kwargs)
    return _LogBar(iterable, **kwargs)


class _LogBar(tqdm):
    """tqdm that writes a plain line at most every ``log_every`` seconds, and one at the end."""

    def __init__(self, iterable=None, **kwargs):
        self._last = time.monotonic()
        self._t0 = self._last
        kwargs.setdefault("mininterval", log_every)
        super().__init__(iterable, file=_Null(), **kwargs)

    def update(self, n=1):
        out = super().update(n)
        now = time.monotonic()
        if now - self._last >= log_every:
            self._last = now
            self._line()
        return out

    def _line(self, end: str = "") -> None:
        total = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        print(f"pyad: {self.desc}: {self.n}{total} {self.unit}{pct}{post}, {time.monotonic() - self._t0:.0f} s{end}",
              file=sys.stderr, flush=True)

    def close(self):
        if not self.disable and time.monotonic() - self._t0 >= log_every:
            self._line(", done")
        super().close()


class _Null:
    def write(self, s):
        pass

    def flush(self):
        pass


@contextmanager
def stage(text: str, after: float = 2.0):
    """Announce a long step that has no natural counter (a coreset selection, a
    solve): a line once it has run ``after`` seconds, and how long it took; quick
    steps stay silent."""
    if enabled is False:
        yield
        return
    import threading

    t0 = time.perf_counter()
    said = threading.Event()

    def say():
        said.set()
        print(f"pyad: {text} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            print(f"pyad: {text}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
