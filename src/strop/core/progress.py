"""Progress as strop shows it, made here for every bar: on a terminal a tqdm bar; in a log (stderr piped
to a file: CI, nohup, a scheduler) a plain line each tenth of the way and at least every 30 s, with the
rate, the ETA and whatever the bar carries (loss, lr), never a line per update; with `-q`, nothing.

`tqdm` keeps tqdm's name and arguments, as tqdm's own variants do (`tqdm.rich.tqdm`): a bar is made and
driven the same way wherever it is, and `disable=None` keeps tqdm's meaning (shown on a terminal only).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from tqdm.std import tqdm as _tqdm

EVERY_SECONDS = 30.0  # a log line at least this often while a bar moves (the only rule without a total)
STEPS = 10  # and one at each tenth of the total
MIN_WINDOW = 1.0  # seconds: a shorter stretch since the last line gives no rate of its own

clock = time.monotonic  # what the plain lines time themselves by (a test replaces it)
_quiet = False  # `-q`


def silence(on: bool) -> None:
    """`-q` (and processes other than a distributed run's first): no bar, no progress line, and no line
    written through a bar (`tqdm.write`: evaluation lines). Errors are not written through bars. Every
    `strop` command sets it (core/logs.setup_logging)."""
    global _quiet
    _quiet = on


def _silenced() -> bool:
    return _quiet


def _on_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed file
        return False


class tqdm(_tqdm):
    """tqdm's bar on a terminal; elsewhere the plain lines the module docstring describes (`plain`)."""

    disable: bool

    def __init__(self, *args, disable: bool | None = False, file=None, **kwargs):
        file = sys.stderr if file is None else file
        terminal = _on_terminal(file)
        if _silenced() or (disable is None and not terminal):
            disable = True
        self.plain = not terminal
        self._said_n: float | None = None  # the count and time of the last plain line
        self._said_t = 0.0
        super().__init__(*args, disable=bool(disable), file=file, **kwargs)
        if self.plain and not self.disable:
            self._said_n, self._said_t = self.n, clock()
            self._began = self._said_t

    @classmethod
    def write(cls, s, file=None, end="\n", nolock=False):
        if not _silenced():
            super().write(s, file=file, end=end, nolock=nolock)

    def update(self, n: float = 1) -> None:
        if not self.plain:
            super().update(n)
        elif not self.disable:
            with self._lock:
                self.n += n
                self._say_if_due()

    def display(self, msg=None, pos=None) -> bool | None:
        """Plain: called by tqdm on a refresh (a new postfix, a line written through a bar): no line. Only
        `update` says one, so a count is never said before the work it counts is done (a postfix set
        before `update(1)` said the last count with this step's time: "1/30 38 s/step", then "9.5")."""
        if not self.plain:
            return super().display(msg, pos)
        return None

    def clear(self, nolock: bool = False) -> None:
        if not self.plain:
            super().clear(nolock)

    def close(self) -> None:
        """Plain: the count reached, unless the last line said it already, with the time it took."""
        if not self.plain or self.disable:
            super().close()
            return
        with self._lock:
            if self.n != self._said_n:
                self._say(clock(), closing=True)
        self.disable = True
        self._decr_instances(self)

    def _say_if_due(self) -> bool:
        if self._said_n is None:  # still in tqdm's __init__
            return False
        now = clock()
        total = self.total
        moved = self.n != self._said_n
        tenth = bool(total) and int(STEPS * self.n / total) > int(STEPS * self._said_n / total)
        if moved and (tenth or now - self._said_t >= EVERY_SECONDS):
            self._say(now, closing=bool(total) and self.n >= total)
            return True
        return False

    def _say(self, now: float, closing: bool) -> None:
        """One line: `train: 40/400 (10%) 3.2 step/s, ETA 01:52, loss=5.91`. The rate is that since the
        last line (over the whole bar in a closing line, which gives the time taken instead of an ETA, or
        when the last line came under MIN_WINDOW ago: a batch of examples finishing at once is no rate)."""
        assert self._said_n is not None
        n, total, unit = self.n, self.total, self.unit
        done, took = n - self._said_n, now - self._said_t
        if closing or took < MIN_WINDOW:  # several items done at once (a batch): the rate since the start
            done, took = n - self.initial, now - self._began
        rate = done / took if took > 0 and done > 0 else None
        line = f"{_count(n)}/{_count(total)} ({int(100 * n / total)}%)" if total else f"{_count(n)} {unit}"
        if rate is not None:
            line += (" " if total else ", ") + _rate(rate, unit)
        if closing:
            line += f", {self.format_interval(now - self._began)} in all"
        elif rate is not None and total:
            line += f", ETA {self.format_interval((total - n) / rate)}"
        desc = self.desc.rstrip(": ")
        line = (f"{desc}: " if desc else "") + line + (f", {self.postfix}" if self.postfix else "")
        self.fp.write(line + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._said_n, self._said_t = n, now


@contextmanager
def drawn_by_strop(module: ModuleType, desc: str, unit: str) -> Iterator[None]:
    """A library's own bar, made with the `tqdm` its `module` imported (which the library's switches do not
    reach: transformers' "Converting and de-quantizing GGUF tensors"), drawn as strop's while inside."""
    own = getattr(module, "tqdm")  # noqa: B009 - any module that imported tqdm by that name
    setattr(module, "tqdm", lambda *args, **kwargs: tqdm(*args, **{**kwargs, "desc": desc, "unit": unit}))  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "tqdm", own)  # noqa: B010


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _rate(per_second: float, unit: str) -> str:
    if per_second >= 1:
        return f"{per_second:,.0f} {unit}/s" if per_second >= 100 else f"{per_second:.3g} {unit}/s"
    return f"{1 / per_second:.3g} s/{unit}"
