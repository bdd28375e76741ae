"""Progress of long work, in a terminal and in a log.

A bar is only useful where someone watches a terminal; a log file, CI output or a `nohup` run
needs lines it can keep. :class:`Progress` (and :func:`track`, its iterator form) picks one:

* stderr is a terminal (or a Jupyter kernel runs): a `tqdm` bar, as before;
* otherwise: ``INFO swiss_knife.progress: <what>: <unit> k/n (x%), <elapsed> elapsed, ~<eta> left``
  through `logging`, when the work starts, each time another tenth of it is done, at least every
  ``interval_s`` seconds while it runs, and when it ends, so a loop of any length writes a
  dozen lines or so, and a slow one still says it is alive.

``enabled=False`` (what `-q` gives) says nothing at all. `tqdm` is imported only when a bar is
drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

logger = logging.getLogger("swiss_knife.progress")

T = TypeVar("T")

#: A log line at least this often (seconds) while work runs, whatever fraction it covers.
INTERVAL_S = 30.0
#: And one each time this fraction of the total more is done.
FRACTION_STEP = 0.1


def use_bar() -> bool:
    """Whether progress is drawn as a bar (a terminal or a notebook) rather than logged."""
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stream
        pass
    return "ipykernel" in sys.modules


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts work done out of ``total`` and reports it as a bar or as log lines.

    Mirrors the part of `tqdm` the toolkit uses (`update`, `set_postfix`, `close`, a context
    manager), so a loop swaps one for the other::

        with Progress("distill", total=steps, unit="step", enabled=progress) as bar:
            for step in range(steps):
                ...
                bar.update()
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "it",
        enabled: bool = True,
        initial: int = 0,
        interval_s: float = INTERVAL_S,
        fraction_step: float = FRACTION_STEP,
    ) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.count = initial
        self.interval_s = interval_s
        self.fraction_step = fraction_step
        self._postfix = ""
        self._bar: Any = None
        self._logging = False
        self._closed = not enabled
        if not enabled:
            return
        if use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)
            return
        self._logging = logger.isEnabledFor(logging.INFO)
        self._started = time.monotonic()
        self._initial = initial
        self._last_time = self._started
        self._last_count = initial
        self._next_fraction = self._fraction(initial) + fraction_step
        if self._logging:
            self._emit()

    def _fraction(self, count: int) -> float:
        return count / self.total if self.total else 0.0

    def _emit(self) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        if self.total:
            text = (
                f"{self.desc}: {self.unit} {self.count}/{self.total} "
                f"({100 * self.count / self.total:.0f}%)"
            )
        else:
            text = f"{self.desc}: {self.unit} {self.count}"
        if self.count > self._initial:
            text += f", {_duration(elapsed)} elapsed"
            done = self.count - self._initial
            if self.total and self.count < self.total:
                left = elapsed / done * (self.total - self.count)
                text += f", ~{_duration(left)} left"
        logger.info("%s%s", text, self._postfix)
        self._last_time = now
        self._last_count = self.count

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self._logging:
            return
        fraction = self._fraction(self.count)
        if self.total and fraction >= self._next_fraction:
            # Skip the boundaries a big step jumped over: one line per update at most.
            steps = int((fraction - self._next_fraction) / self.fraction_step) + 1
            self._next_fraction += steps * self.fraction_step
            self._emit()
        elif time.monotonic() - self._last_time >= self.interval_s:
            self._emit()

    def set_postfix(self, values: Mapping[str, object]) -> None:
        """Extra ``key=value`` fields shown after the count (loss, throughput, ...)."""
        if self._bar is not None:
            self._bar.set_postfix(dict(values), refresh=False)
        else:
            self._postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._logging and self.count != self._last_count:
            self._emit()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
            self._closed = True
        else:
            self._closed = True  # a failed run's error says enough; no "done" line


def track(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
) -> Iterator[T]:
    """Iterate over ``iterable``, reporting progress as :class:`Progress` does.

    ``total`` defaults to ``len(iterable)`` when it has one.
    """
    if not enabled:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = Progress(desc, total, unit=unit)
    try:
        for item in iterable:
            yield item
            bar.update()
    except GeneratorExit:
        bar.close()  # the caller stopped early: say where it got to
        raise
    except BaseException:
        bar.__exit__(Exception, None, None)
        raise
    bar.close()
