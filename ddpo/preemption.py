"""Preemption and time limits: save a checkpoint at the end of the epoch, then let the job be requeued.

SLURM, through submitit, sends USR2 (``SUBMITIT_PREEMPT_SIGNAL``) ``signal_delay_s`` before a time
limit, and on preemption where the cluster is set up for it. Inside the job, submitit has installed
its own handler for that signal: on rank 0 it pickles the job again (the Hydra launcher's
``checkpoint`` re-submits the same task, same config and output directory), runs
``scontrol requeue`` and exits; SLURM kills the job soon after. Left alone, it would do that in the
middle of an epoch and the run would lose up to ``save_freq`` epochs.

``PreemptionGuard`` takes over the signal for the duration of training:

1. the handler only records that the signal came (safe at any point, in any rank);
2. at the end of every epoch all ranks agree on it (a max over ranks, so one rank's signal is
   enough), and if it came every rank saves a checkpoint and then hands the signal to the handler
   that was there before: submitit's requeues the job (and rank 0 exits), a default handler ends
   the process as the signal would have;
3. should the epoch not end within ``grace_s`` of the signal, the previous handler gets the
   signal anyway, at whatever point the run is, so that the job is still requeued before it is
   killed; the run then resumes from its last regular checkpoint (at most ``save_freq`` epochs back).

The requeued job runs train.py again in the same output directory and resumes from the newest
checkpoint by itself (ddpo/trainer.py).
"""

import _thread
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


def preemption_signal() -> signal.Signals:
    """The signal submitit uses for preemption and time limits (USR2 unless configured otherwise)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


class PreemptionGuard:
    """Defers the preemption signal to an epoch boundary; see the module docstring."""

    def __init__(self, grace_s: float, signum: int | None = None):
        self.grace_s = grace_s
        self.signum = signum if signum is not None else preemption_signal()
        self.received_at: float | None = None
        self._previous = None
        self._installed = False
        self._timer: threading.Timer | None = None
        self._forwarding = False

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> "PreemptionGuard":
        """Take over the signal (only possible from the main thread; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(self.signum) == signal.SIG_IGN:  # someone chose to ignore it: so do we
            return self
        self._previous = signal.signal(self.signum, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- the signal -----------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self._forwarding:  # the grace period is over: let the previous handler act now
            self._call_previous(frame)
            return
        if self.received_at is None:
            self.received_at = time.monotonic()
            self._timer = threading.Timer(self.grace_s, self._grace_over)
            self._timer.daemon = True
            self._timer.start()
        log.warning(
            "received %s: saving a checkpoint at the end of this epoch (within %.0f s)",
            signal.Signals(signum).name,
            self.grace_s,
        )

    def _grace_over(self) -> None:
        log.warning(
            "the epoch did not end within %.0f s of %s: handing it over without a checkpoint",
            self.grace_s,
            signal.Signals(self.signum).name,
        )
        self._forwarding = True
        _thread.interrupt_main(self.signum)  # runs _handle in the main thread

    def _call_previous(self, frame=None) -> None:
        previous = self._previous
        self.uninstall()
        if callable(previous):
            previous(self.signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), self.signum)  # what the signal would have done (terminate)

    # -- the epoch boundary ---------------------------------------------------------------------
    def requested(self, accelerator) -> bool:
        """Whether any rank received the signal (collective: call it on every rank)."""
        from ddpo.distributed import any_rank

        return any_rank(accelerator, self.received_at is not None)

    def hand_over(self) -> None:
        """After the checkpoint: give the signal to the handler that was there before, then exit.

        In a submitit job, rank 0's handler requeues the job and exits; the other ranks' handlers
        return, and those ranks exit here.
        """
        if self._timer is not None:
            self._timer.cancel()
        log.warning("checkpoint saved after %s; handing over for requeue", signal.Signals(self.signum).name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._call_previous()
        sys.exit(0)
