"""Progress of long loops: a tqdm bar on a terminal; elsewhere (pipes, CI logs, files) no bar
but a plain line every ``every_s`` seconds, so a long evaluation or label run is never silent."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """``update(n)`` as items finish; ``close()`` at the end.

    Args:
        total: items expected.
        desc: what is counted ("eval easyvqa", "labels").
        unit: the item ("sample", "image").
        position: the bar's line (several workers, one line each).
        every_s: seconds between plain progress lines when stderr is not a terminal.
    """

    def __init__(
        self, total: int, desc: str, unit: str = "it", position: int = 0, every_s: float = 30.0
    ) -> None:
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            position=position,
            leave=position == 0,
            dynamic_ncols=True,
            disable=None,  # off when stderr is not a TTY
        )
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.t0 = self.t_last = time.monotonic()

    @property
    def on_terminal(self) -> bool:
        return not self.bar.disable

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if not self.on_terminal and now - self.t_last >= self.every_s:
            self.t_last = now
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s, {now - self.t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()
