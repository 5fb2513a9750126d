"""Calling the reward: in a background thread while the next batch samples, checked, and abandoned
when the run stops.

A reward is ``(images, prompts, metadata) -> (rewards, info)``; what comes back is checked here
(one finite number per image) so that a broken reward is one line naming it, never a shape error
later in the loop.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for

import numpy as np
import torch

from ddpo.errors import DDPOError

log = logging.getLogger(__name__)

REWARD_POLL_S = 0.2  # how often the loop, waiting for a reward, looks at signals

SHUTDOWN_JOIN_S = 10.0  # at most this long for an idle reward thread to end when the run ends


class RewardError(DDPOError):
    """A reward function failed or returned unusable values."""


class RewardWorker:
    """One background thread for rewards, so they run while the next batch samples.

    On the CPU the thread computes with one intra-op thread: a second OpenMP team would make the
    OpenMP runtime count more threads than cores and stop spin-waiting, which slows every UNet
    call of the sampling and training loop by about 1.7x on 2 cores.

    The thread is a daemon (a ThreadPoolExecutor's is not): when the run stops while a reward call
    hangs (a remote server that never answers), the process still ends.
    """

    def __init__(self, device):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Event()  # set while a call runs
        one_thread = torch.device(device).type == "cpu"
        self._thread = threading.Thread(target=self._work, args=(one_thread,), name="reward", daemon=True)
        self._thread.start()

    def _work(self, one_thread: bool) -> None:
        if one_thread:
            torch.set_num_threads(1)
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            self._busy.set()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the loop, which decides
                future.set_exception(exc)
            finally:
                self._busy.clear()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Stop after the call in progress (if any); calls still queued never start.

        An idle thread is joined: one still ending while the interpreter exits may meet torch's C++
        state torn down under it ("terminate called without an active exception", SIGABRT). A thread
        inside a call (a reward that hangs) is left to the daemon rule, so that the run can stop.
        """
        self._queue.put(None)
        if not self._busy.is_set():
            self._thread.join(timeout=SHUTDOWN_JOIN_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _as_numbers(name: str, what: str, value) -> torch.Tensor:
    """``value`` as a flat float32 tensor, or a RewardError saying what the reward returned instead."""
    try:
        array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise RewardError(
            f"reward {name!r} returned {what} that are not numbers ({type(exc).__name__}: {str(exc)[:100]})"
        ) from None
    return torch.as_tensor(array).reshape(-1)


def check_reward_output(name: str, output, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Validate what a reward returned: one finite number per image (and an info dict)."""
    if not (isinstance(output, tuple) and len(output) == 2):
        raise RewardError(f"reward {name!r} must return (rewards, info), got {type(output).__name__}")
    rewards, info = output
    rewards = _as_numbers(name, "rewards", rewards) if rewards is not None else None
    if rewards is None or rewards.numel() != batch_size:
        got = "None" if rewards is None else rewards.numel()
        raise RewardError(f"reward {name!r} returned {got} values for {batch_size} images")
    bad = (~torch.isfinite(rewards)).sum().item()
    if bad:
        raise RewardError(f"reward {name!r} returned {bad} non-finite value(s) (NaN/inf) for {batch_size} images")
    clean_info = {}
    for key, value in (info or {}).items():
        value = _as_numbers(name, f"info[{key!r}] values", value)
        if value.numel() == batch_size:
            clean_info[key] = value
    return rewards, clean_info


def abandon_reward(reward_fn) -> None:
    """Let a reward give up a call in progress (a remote reward shuts its sockets), when the run stops."""
    close = getattr(reward_fn, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # stopping anyway: say so, never mask the reason for stopping
            log.warning("the reward's close() failed: %s: %s", type(exc).__name__, exc)


def timed_call(fn: Callable, *args):
    """``(fn(*args), seconds)``: how long the reward itself ran, in its own thread."""
    started = time.perf_counter()
    output = fn(*args)
    return output, time.perf_counter() - started


def collect_reward(
    name: str, future: Future, batch_size: int, stop: Callable[[], None] | None = None
) -> tuple[torch.Tensor, dict, float]:
    """The reward's (rewards, info, seconds) of one batch, checked; a failure is one line.

    The project's own errors (``DDPOError``: ``RewardError``, a remote reward's ``RemoteRewardError``, ...)
    already say in one line what failed and where, so they pass through as raised; any other exception
    is named with the reward it came from. While it waits, signal handlers run (Ctrl-C, the preemption
    guard's hand-over) and ``stop()`` is called every ``REWARD_POLL_S``: it raises to give up waiting.
    """
    while not wait_for([future], timeout=REWARD_POLL_S).done:
        if stop is not None:
            stop()
    try:
        output, seconds = future.result()
    except DDPOError:
        raise
    except Exception as exc:
        raise RewardError(f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
    return (*check_reward_output(name, output, batch_size), seconds)


def finite_mean(values: np.ndarray) -> float | None:
    """The mean of the finite entries (a reward's NaN info entry means "does not apply"); None if there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
