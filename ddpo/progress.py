"""Progress of a whole run: epochs done / total, the current phase, time per epoch and an ETA.

On a terminal it is a tqdm bar over the run's epochs (the phase in its postfix; the sampling,
training and evaluation bars below it). Anywhere else (a log file, a SLURM job, submitit's logs) no
bar is drawn, so no carriage returns or escape codes reach the files: the ETA goes into the epoch's
log line instead. Epochs are counted from 1 everywhere a person reads them.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm


def interactive(stream=None) -> bool:
    """Whether progress bars draw: the stream (stderr, where tqdm writes) is a terminal."""
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar_disabled(main_process: bool) -> bool | None:
    """tqdm's ``disable``: always off on the other processes; None = off unless stderr is a terminal."""
    return True if not main_process else None


def duration(seconds: float) -> str:
    """``1h02m``, ``12m05s``, ``41s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunProgress:
    """The run's epochs: ``start_epoch`` (resumed epochs count as done), ``phase(name)``, ``epoch_done()``."""

    def __init__(self, num_epochs: int, done: int, main_process: bool):
        self.num_epochs, self.done = num_epochs, done
        self.started, self.epochs_here = time.perf_counter(), 0
        self.bar, self._redirect = None, None
        if main_process and interactive():
            from tqdm.contrib.logging import logging_redirect_tqdm

            # the console's log lines go above the bars instead of through them
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()
            self.bar = tqdm(
                total=num_epochs,
                initial=done,
                desc="run",
                unit="epoch",
                position=0,
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} epochs |{bar}| {elapsed}<{remaining}, {rate_fmt}{postfix}",
            )

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)

    def epoch_done(self) -> None:
        self.done += 1
        self.epochs_here += 1
        if self.bar is not None:
            self.bar.update(1)

    def seconds_per_epoch(self) -> float | None:
        """The mean wall time of this start's epochs (evaluation and checkpoints included)."""
        if not self.epochs_here:
            return None
        return (time.perf_counter() - self.started) / self.epochs_here

    def eta_text(self) -> str:
        """``ETA 12m05s`` (the remaining epochs at this start's mean epoch time), or "" before the first epoch."""
        per_epoch = self.seconds_per_epoch()
        left = self.num_epochs - self.done
        if per_epoch is None:
            return ""
        return "done" if left <= 0 else f"ETA {duration(left * per_epoch)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
