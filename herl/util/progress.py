"""Progress of long stages on the terminal: one line that redraws itself, for example
`rollout: 384/512 sequences, 9,870 tokens/s` or `train: 3/4 optimizer steps, loss 0.0321`.

Shown only when stderr is a terminal, so log files and CI output stay readable;
HERL_PROGRESS=1 forces it on (then, off a terminal, a line at each tenth of the work
instead of a redrawn one) and HERL_PROGRESS=0 off. The stages' numbers themselves go to the
metrics tables as always; this is only what a person watching sees.
"""

from __future__ import annotations

import os
import sys
import time


def enabled() -> bool:
    forced = os.environ.get("HERL_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


class Progress:
    """`with Progress("rollout", total=512, unit="sequences") as p: p.update(64, tokens=1200)`;
    a `tokens` count is shown as tokens/s, any other keyword as `name value`."""

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.tokens = 0, 0
        self.info: dict[str, float] = {}
        self.on = enabled() and total > 0
        self.redraw = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.shown_at, self.shown_tenth = 0.0, -1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, tokens: int = 0, **info: float) -> None:
        self.done += n
        self.tokens += tokens
        self.info.update(info)
        if not self.on:
            return
        now, tenth = time.perf_counter(), 10 * self.done // self.total
        if self.redraw and (now - self.shown_at >= 0.1 or self.done >= self.total):
            self.shown_at = now
            self._show(end="")
        elif not self.redraw and tenth != self.shown_tenth:
            self.shown_tenth = tenth
            self._show(end="\n")

    def line(self) -> str:
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}"]
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        if self.tokens:
            parts.append(f"{self.tokens / seconds:,.0f} tokens/s")
        parts += [f"{name} {value:.4g}" for name, value in self.info.items()]
        if 0 < self.done < self.total:  # at the rate so far
            parts.append(f"{seconds:.0f} s, about {seconds * (self.total - self.done) / self.done:.0f} s left")
        elif self.done >= self.total:
            parts.append(f"{seconds:.0f} s")
        return ", ".join(parts)

    def _show(self, end: str) -> None:
        sys.stderr.write(("\r\x1b[2K" if self.redraw else "") + self.line() + end)
        sys.stderr.flush()

    def close(self) -> None:
        if self.on and self.redraw:
            self._show(end="\n")  # leave the last state on its own line
        self.on = False
