"""The DDPO loop: sample -> reward (async) -> advantages -> PPO updates -> log -> checkpoint.

Each phase is a function with plain inputs and outputs; ``train`` runs them in order. The loop
reads a ``RunConfig`` (plain dataclasses) and the components built by ``ddpo.config.build``.
"""

import contextlib
import errno
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.algorithms import Algorithm
from ddpo.config_history import RunRecord
from ddpo.distributed import any_rank
from ddpo.errors import ConfigError, DDPOError, Interrupted, WeightsMismatch
from ddpo.logging import EVAL_FILE, METRICS_FILE, MetricsFile, RunTracker, log_to_files, plot_reward_curve
from ddpo.pipelines.base import DDPOPipeline, Rollout
from ddpo.preemption import PreemptionGuard
from ddpo.seeds import shuffle_seed

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "ddpo_state.json"
MAX_STATE_BYTES = 64 << 20  # a loop state is KBs (per-prompt statistics: 16 numbers a prompt)
REWARD_POLL_S = 0.2  # how often the loop, waiting for a reward, looks at signals
SHUTDOWN_JOIN_S = 10.0  # at most this long for an idle reward thread to end when the run ends


class RewardError(DDPOError):
    """A reward function failed or returned unusable values."""


@dataclass
class Components:
    """What the loop runs on; built from the config by ``ddpo.config.build``."""

    accelerator: Any
    pipeline: DDPOPipeline
    algorithm: Algorithm
    reward_fn: Callable
    reward_name: str
    prompt_fn: Callable
    tracker: RunTracker
    image_hook: Callable | None
    run_dir: str
    plan: Any  # ddpo.config.BatchPlan
    run_lock: Any = None  # ddpo.run_lock.RunLock held by the main process, released when training ends
    evaluator: Any = None  # ddpo.evaluation.Evaluator when eval.every > 0
    record: RunRecord | None = None  # the config this start trains with: into every checkpoint, and the history
    resume: Any = None  # ResumePlan: what to resume from, found (and checked) before the model was built


@dataclass
class TrainingState:
    """The loop's own state, saved in every checkpoint as JSON (``ddpo_state.json``).

    Not registered with accelerate, whose custom checkpoint objects are pickles loaded with
    ``weights_only=False``: a crafted checkpoint could run code on resume.
    """

    epochs_completed: int = 0
    global_step: int = 0
    algorithm: Algorithm | None = None  # its state (e.g. DDPO's per-prompt reward buffers) is saved too

    def state_dict(self) -> dict:
        return {
            "epochs_completed": self.epochs_completed,
            "global_step": self.global_step,
            "algorithm": self.algorithm.state_dict() if self.algorithm is not None else {},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state that ``state_problem`` accepted; the algorithm's part first (it may refuse)."""
        if self.algorithm is not None:
            self.algorithm.load_state_dict(state.get("algorithm") or {})
        self.epochs_completed = int(state["epochs_completed"])
        self.global_step = int(state["global_step"])


def state_problem(state, checkpoint: str) -> str | None:
    """What is wrong with a checkpoint's loop state (types, ranges, its directory's name), or None.

    Each epoch takes at least one optimizer step, and ``checkpoint_<n>`` is written after epoch n.
    """

    def count(key: str):
        value = state.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    if not isinstance(state, dict):
        return f"not a JSON object ({type(state).__name__})"
    epochs, steps = count("epochs_completed"), count("global_step")
    if epochs is None or epochs < 1:
        return f"epochs_completed must be a whole number >= 1 (got {state.get('epochs_completed')!r})"
    if steps is None or steps < epochs:
        return f"global_step must be a whole number >= epochs_completed={epochs} (got {state.get('global_step')!r})"
    named = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(os.path.normpath(checkpoint)))
    if named and int(named.group(1)) != epochs:
        return f"epochs_completed={epochs} contradicts the checkpoint's name {os.path.basename(checkpoint)}"
    if not isinstance(state.get("algorithm", {}), dict):
        return f"'algorithm' must be an object (got {type(state['algorithm']).__name__})"
    return None


# -- rewards ------------------------------------------------------------------------------------
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


reward_executor = RewardWorker


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


# -- phases ---------------------------------------------------------------------------------------
@dataclass
class EpochSamples:
    """This process's samples of one epoch, concatenated over its sampling batches."""

    batch: Rollout
    prompts: list[str]
    metadata: list[dict]
    rewards: torch.Tensor  # (N,)
    reward_info: dict[str, torch.Tensor]
    batch_images: list  # [[images, prompts, metadata, rewards], ...] for image hooks
    sample_s: float  # sampling alone
    reward_wait_s: float  # waiting for rewards after sampling ended
    reward_s: float  # the rewards' own run time (overlapped with sampling, except the wait)


def sample_epoch(
    comps: Components, run, epoch: int, executor: RewardWorker, stop: Callable[[], None] | None = None
) -> EpochSamples:
    """Sample ``num_batches_per_epoch`` batches; each batch's reward runs while the next samples.

    ``stop``: called while waiting for rewards; it raises to abandon the epoch (see ``collect_reward``).
    """
    s = run.sample
    accelerator, pipeline, algorithm = comps.accelerator, comps.pipeline, comps.algorithm
    # sample k of process p is sample p * n + k of the epoch (the order gather() returns), and its
    # prompt and noise come from seeds of its index: an epoch holds the same samples for any process count
    first = accelerator.process_index * s.batch_size * s.num_batches_per_epoch
    batches, prompts_all, meta_all, futures = [], [], [], []
    pipeline.trainable_module().eval()
    started = time.perf_counter()
    bar = tqdm(
        range(s.num_batches_per_epoch),
        desc=f"epoch {epoch}: sampling",
        leave=False,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    for i in bar:
        indices = [first + i * s.batch_size + j for j in range(s.batch_size)]
        seeds = [algorithm.sample_seeds(run.seed, epoch, index) for index in indices]
        prompts, metadata = map(list, zip(*(comps.prompt_fn(random.Random(prompt_seed)) for prompt_seed, _ in seeds)))
        generator = [torch.Generator(device=accelerator.device).manual_seed(noise_seed) for _, noise_seed in seeds]
        shared = [algorithm.shared_noise_seed(run.seed, epoch, index) for index in indices]
        branch = [algorithm.branch_step(run.seed, epoch, index) for index in indices]
        noise = {}  # only what the algorithm asks for: a pipeline written for sample(conditioning, generator) still runs
        if any(seed is not None for seed in shared):
            noise["shared_generator"] = [torch.Generator(device=accelerator.device).manual_seed(x) for x in shared]
        if any(k is not None for k in branch):
            noise["branch_steps"] = branch
        batch = pipeline.sample(pipeline.encode_prompts(prompts), generator=generator, **noise)
        futures.append(executor.submit(timed_call, comps.reward_fn, batch.images, prompts, metadata))
        batches.append(batch)
        prompts_all.extend(prompts)
        meta_all.extend(metadata)
    waited = time.perf_counter()
    results = [collect_reward(comps.reward_name, f, s.batch_size, stop) for f in futures]
    reward_wait_s = time.perf_counter() - waited
    rewards = torch.cat([r for r, _, _ in results])
    info = {
        key: torch.cat([inf[key] for _, inf, _ in results])
        for key in results[0][1]
        if all(key in inf for _, inf, _ in results)
    }
    hook_data = (
        [  # copied to the host only when a hook will read it
            [
                b.images.float().cpu(),
                prompts_all[j * s.batch_size : (j + 1) * s.batch_size],
                meta_all[j * s.batch_size : (j + 1) * s.batch_size],
                r.cpu(),
            ]
            for j, (b, (r, _, _)) in enumerate(zip(batches, results))
        ]
        if comps.image_hook is not None
        else []
    )
    return EpochSamples(
        Rollout.cat(batches),
        prompts_all,
        meta_all,
        rewards,
        info,
        hook_data,
        sample_s=waited - started,
        reward_wait_s=reward_wait_s,
        reward_s=sum(t for _, _, t in results),
    )


def compute_advantages(comps: Components, samples: EpochSamples):
    """Gather rewards and prompts from every process, let the algorithm turn them into advantages,
    and return this process's share.

    Returns (this process's advantages, all rewards, all reward extras, all prompts).
    """
    accelerator = comps.accelerator
    device = accelerator.device
    all_rewards = accelerator.gather(samples.rewards.to(device)).cpu().numpy()
    all_info = {k: accelerator.gather(v.to(device)).cpu().numpy() for k, v in samples.reward_info.items()}
    all_prompts = samples.prompts  # every process's, in gather() order: the algorithm and the logs need them
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        all_prompts = gather_object(samples.prompts)
    advantages = comps.algorithm.advantages(all_rewards, all_prompts)
    mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
    return torch.as_tensor(mine, dtype=torch.float32, device=device), all_rewards, all_info, all_prompts


def train_epoch(
    comps: Components,
    run,
    epoch: int,
    samples: Rollout,
    advantages: torch.Tensor,
    optimizer,
    model,
    state: TrainingState,
) -> dict[str, float]:
    """``num_inner_epochs`` passes of the algorithm's loss over this process's samples; returns mean diagnostics."""
    t, plan = run.train, comps.plan
    accelerator, pipeline, algorithm = comps.accelerator, comps.pipeline, comps.algorithm
    device = accelerator.device
    n, num_steps = samples.log_probs.shape
    trained = plan.trained_timesteps
    generator = torch.Generator().manual_seed(shuffle_seed(run.seed, epoch, accelerator.process_index))
    totals: dict[str, list] = {"loss": [], "grad_norm": []}
    parameters = pipeline.trainable_parameters()
    model.train()
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(n)])[:, :trained]
        bar = tqdm(
            range(plan.train_batches_per_epoch),
            desc=f"epoch {epoch}.{inner}: training",
            leave=False,
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        for b in bar:
            rows = order[b * t.batch_size : (b + 1) * t.batch_size]
            batch_advantages = advantages[rows.to(device)]
            last_of_step = (b + 1) % t.gradient_accumulation_steps == 0
            for start in range(0, trained, t.timesteps_per_call):
                steps = step_order[rows, start : start + t.timesteps_per_call]
                batch = {k: v.to(device) for k, v in samples.transitions(rows, steps).items()}
                adv = batch_advantages.repeat_interleave(steps.shape[1])
                sync = last_of_step and start + t.timesteps_per_call >= trained
                # every transition weighs the same in an optimizer step, however they are grouped
                weight = steps.shape[1] / (trained * t.gradient_accumulation_steps)
                context = contextlib.nullcontext() if sync else accelerator.no_sync(model)
                with context:
                    loss, stats = algorithm.loss(pipeline, batch, adv)
                    accelerator.backward(loss * weight)
                totals["loss"].append(loss.detach())
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
                if sync:
                    grad_norm = accelerator.clip_grad_norm_(parameters, t.max_grad_norm)
                    totals["grad_norm"].append(torch.as_tensor(grad_norm, device=device).float())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
    means = {}
    for key, values in totals.items():
        value = torch.stack([v.float() for v in values]).mean() if values else torch.zeros((), device=device)
        means[key] = accelerator.reduce(value.to(device), reduction="mean").item()
    return means


# -- checkpoints --------------------------------------------------------------------------------
def read_state(checkpoint: str) -> dict:
    """The loop state of a checkpoint, checked (``state_problem``), or a DDPOError naming the file."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        if not os.path.isfile(path):
            raise OSError(f"not a regular file: {path}" if os.path.exists(path) else "missing")
        with open(path) as handle:
            text = handle.read(MAX_STATE_BYTES + 1)
        if len(text) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES >> 20} MiB")
        state = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise DDPOError(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:100]})") from None
    problem = state_problem(state, checkpoint)
    if problem:
        raise DDPOError(f"{path} is invalid: {problem}")
    return state


def metrics_problem(state: dict, checkpoint: str) -> str | None:
    """Whether the run's metrics.jsonl contradicts a checkpoint: its record of the checkpoint's last
    epoch (written just before the checkpoint) must show the same global step."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        return None
    last = state["epochs_completed"] - 1
    for record in MetricsFile(run_dir).read():
        if record.get("epoch") == last and record.get("global_step") != state["global_step"]:
            return (
                f"global_step={state['global_step']} contradicts metrics.jsonl, whose record of epoch {last} "
                f"has global_step={record.get('global_step')}"
            )
    return None


def list_checkpoints(run_dir: str, damaged: list[str] | None = None) -> list[tuple[int, str]]:
    """(epochs_completed, path) of every checkpoint under ``run_dir`` with a readable state, oldest first.

    A ``checkpoint_*`` directory whose state is missing or unreadable (a published checkpoint always
    has one) is damaged: warned about and, if ``damaged`` is given, added to it as "path (why)".
    """
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if (
                name.endswith(".partial")
                or not os.path.isdir(path)
                or not (name.startswith("checkpoint_") or os.path.isfile(os.path.join(path, STATE_FILE)))
            ):
                continue
            try:
                found.append((int(read_state(path)["epochs_completed"]), path))
            except DDPOError as exc:
                log.warning("skipping checkpoint %s: %s", path, exc)
                if damaged is not None:
                    damaged.append(f"{path} ({exc})")
    return sorted(found)


def resume_candidates(path: str) -> list[str]:
    """Checkpoints to resume from, newest first, given a checkpoint or a run directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise DDPOError(f"resume_from={path}: no checkpoint there (expected {CHECKPOINT_DIR}/*/{STATE_FILE})")
    return [p for _, p in reversed(found)]


@dataclass
class ResumePlan:
    """Checkpoints to resume from, newest first; ``own``: this run's, not another's (``resume_from``)."""

    candidates: list[str]
    damaged: list[str]  # this run's checkpoints with no readable state: never a reason to start afresh
    own: bool


def plan_resume(run_dir: str, resume_from: str | None) -> ResumePlan:
    damaged: list[str] = []
    candidates = [p for _, p in reversed(list_checkpoints(run_dir, damaged))]
    if not candidates and not damaged and resume_from:
        return ResumePlan(resume_candidates(resume_from), [], own=False)
    return ResumePlan(candidates, damaged, own=True)


def check_resume(plan: ResumePlan, record: RunRecord | None, num_epochs: int) -> None:
    """Before the model is built: refuse to continue a checkpoint with a changed config (unless
    ``resume_with_changes``), or to "continue" another run that has nothing left to train."""
    if not plan.candidates:
        return
    newest = plan.candidates[0]
    if record is not None:
        record.check_against(newest, own_run=plan.own)
    if not plan.own:
        done = read_state(newest)["epochs_completed"]
        if done >= num_epochs:
            raise ConfigError(
                f"resume_from={newest} has already trained {done} epoch(s), and this run's num_epochs={num_epochs}: "
                f"nothing would be trained; set num_epochs above {done} to train more from it"
            )


def load_checkpoint(accelerator, state: TrainingState, candidates: list[str], damaged: list[str] = ()) -> str:
    """Load the newest checkpoint of ``candidates`` that loads whole; warn about each that does not.

    If none loads, the error names each of them and each of ``damaged`` ("path (why)", unreadable state).
    """
    failures = []
    for path in candidates:
        rng_file = os.path.join(path, f"random_states_{accelerator.process_index}.pkl")
        if not os.path.isfile(rng_file):
            log.warning(
                "%s is missing: resuming without its random state (sampling is seeded per sample and "
                "unaffected; dropout or other global randomness may differ)",
                rng_file,
            )
        try:
            loop_state = read_state(path)
            problem = metrics_problem(loop_state, path)
            if problem:
                raise DDPOError(problem)
            with warn_on_unloadable_rng(rng_file):
                accelerator.load_state(path)
            state.load_state_dict(loop_state)
        except WeightsMismatch as exc:  # every checkpoint of the run has that shape: falling back cannot help
            raise WeightsMismatch(f"cannot resume from {path}: {exc}") from None
        except Exception as exc:  # truncated weights, missing or torn optimizer state, invalid state file
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            failures.append(f"{path} ({reason})")
            log.warning(
                "checkpoint %s cannot be loaded (%s)%s",
                path,
                reason,
                "; trying the previous one" if path != candidates[-1] else "",
            )
            continue
        if "algorithm" not in loop_state and state.algorithm is not None and state.algorithm.state_dict():
            log.warning(
                "%s holds no algorithm state (an older checkpoint keeps the per-prompt statistics in a "
                "pickle, which is never read): they start empty",
                os.path.join(path, STATE_FILE),
            )
        return path
    raise DDPOError(
        "no checkpoint could be loaded: "
        + "; ".join(sorted([*failures, *damaged], reverse=True))
        + " (none was deleted)"
    )


@contextlib.contextmanager
def warn_on_unloadable_rng(rng_file: str):
    """accelerate logs an RNG file it cannot read (tampered, wrong format) as INFO and goes on: a warning
    naming the file instead (the run resumes; sampling noise is seeded per sample and unaffected)."""

    class Catch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "Could not load random state" in record.getMessage():
                log.warning(
                    "%s could not be loaded (damaged or not an RNG state): resuming without it (sampling is "
                    "seeded per sample and unaffected; dropout or other global randomness may differ)",
                    rng_file,
                )
                return False
            return True

    catch = Catch()
    logger = logging.getLogger("accelerate.checkpointing")
    level = logger.level
    if not logger.isEnabledFor(logging.INFO):  # the INFO record must be made for the filter to see it
        logger.setLevel(logging.INFO)
    logger.addFilter(catch)
    try:
        yield
    finally:
        logger.removeFilter(catch)
        logger.setLevel(level)


def save_checkpoint(comps: Components, run, state: TrainingState) -> str:
    """save_state on every rank into a temporary directory, then publish it and prune old ones.

    A checkpoint appears whole or not at all; a full disk removes the partial one and stops the run
    with one line (older checkpoints and the metrics are untouched).
    """
    accelerator = comps.accelerator
    root = os.path.join(comps.run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"checkpoint_{state.epochs_completed:05d}")
    tmp = final + ".partial"
    full = (
        f"the disk is full: the checkpoint of epoch {state.epochs_completed} could not be written to {tmp} "
        "(removed; older checkpoints and metrics.jsonl are intact). Free space and rerun the same command to resume"
    )
    with stop_on_full_disk(tmp, full):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, STATE_FILE), "w") as handle:
                json.dump(state.state_dict(), handle)
            if comps.record is not None:
                comps.record.save(tmp)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if run.checkpoints_total_limit:
            for _, old in list_checkpoints(comps.run_dir)[: -run.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def stop_on_full_disk(tmp: str, message: str):
    """Write into ``tmp`` inside this block; on a full disk remove ``tmp`` and stop with ``message``."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise DDPOError(message) from None


DISK_NEARLY_FULL = 1 << 20  # bytes: a write that fails with less free than this failed for want of space


def disk_full(exc: BaseException, path: str | None = None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk; torch wraps the OSError in a RuntimeError.

    torch.save's C++ writer can also fail with a bare "iostream error" (no errno): then the free
    space where ``path`` was being written decides.
    """
    first = exc
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    if path is None or not isinstance(first, (OSError, RuntimeError)):
        return False
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path or ".")
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < DISK_NEARLY_FULL


def register_weight_hooks(accelerator, pipeline: DDPOPipeline) -> None:
    """Checkpoints hold only the trained weights, in diffusers format (``pipeline.save_trained``)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            pipeline.save_trained(output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        pipeline.load_trained(input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_final(pipeline: DDPOPipeline, final_dir: str) -> list[str]:
    """Export the trained weights to ``final_dir`` atomically: whole, or not there at all.

    A full disk removes the partial export and stops with one line: the last checkpoint holds the
    same weights, and the rerun writes ``final_dir`` from it.
    """
    tmp = final_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    full = (
        f"the disk is full: the trained weights could not be written to {final_dir} (the partial copy is removed; "
        "the last checkpoint holds the same weights). Free space and rerun the same command: it writes final/ "
        "from the last checkpoint"
    )
    with stop_on_full_disk(tmp, full):
        files = pipeline.export(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    return [final_dir + f[len(tmp) :] for f in files]


def append_record(metrics: MetricsFile, record: dict, run_dir: str) -> None:
    """Append the epoch's record; a full disk stops with one line (the epoch is redone on resume)."""
    try:
        metrics.append(record)
    except Exception as exc:
        if not disk_full(exc, metrics.path):
            raise
        raise DDPOError(
            f"the disk is full: the record of epoch {record['epoch']} could not be appended to {metrics.path} "
            f"(checkpoints in {os.path.join(run_dir, CHECKPOINT_DIR)} are intact). Free space and rerun the same "
            "command to resume"
        ) from None


def check_finite_training(stats: dict[str, float], epoch: int, run_dir: str) -> None:
    """Stop before a diverged epoch is saved: its weights are NaN, the last checkpoint is still good."""
    for key in ("loss", "grad_norm"):
        if not math.isfinite(stats[key]):
            raise DDPOError(
                f"epoch {epoch}: the training {key} is {stats[key]} (not finite), so the weights diverged; "
                "nothing of this epoch was saved (the last checkpoint in "
                f"{os.path.join(run_dir, CHECKPOINT_DIR)} is intact); lower train.learning_rate"
            )


def check_finite_weights(pipeline: DDPOPipeline, epoch: int, run_dir: str) -> None:
    """Never checkpoint or export NaN weights: the last step of an epoch can diverge after its loss was finite."""
    parameters = pipeline.trainable_parameters()
    if not bool(torch.stack([p.detach().isfinite().all() for p in parameters]).all()):
        raise DDPOError(
            f"epoch {epoch}: the trained weights hold NaN or infinite values (training diverged); "
            f"nothing of this epoch was saved (the last checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)}"
            " is intact); lower train.learning_rate"
        )


def run_image_hook(comps: Components, image_data, global_step: int, epoch: int) -> str | None:
    """Call the image hook; a failure is returned as a one-line reason (the epoch is checkpointed first)."""
    if comps.image_hook is None:
        return None
    try:
        comps.image_hook(image_data, global_step, comps.tracker)
    except Exception as exc:
        name = getattr(comps.image_hook, "func", comps.image_hook)
        name = f"{getattr(name, '__module__', '?')}.{getattr(name, '__qualname__', repr(name))}"
        log_to_files(f"the image hook {name} failed at epoch {epoch}:\n{traceback.format_exc()}")  # for its author
        return (
            f"the image hook {name} (logger.image_hook) failed at epoch {epoch}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}"
        )
    return None


def finite_mean(values: np.ndarray) -> float | None:
    """The mean of the finite entries (a reward's NaN info entry means "does not apply"); None if there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def run_evaluation(comps: Components, evals: MetricsFile, state: TrainingState) -> dict[str, float]:
    """Evaluate the current policy (``eval.*``); append it to eval.jsonl and the tracker; return its eval_* numbers."""
    from ddpo.evaluation import flat_metrics

    started = time.perf_counter()
    with comps.pipeline.evaluation():  # the family's evaluation sampler (flow: the ODE, eval_num_steps)
        summary = comps.evaluator.run(comps.pipeline, comps.accelerator)
    values = flat_metrics(summary)
    values["eval_time_s"] = time.perf_counter() - started
    if comps.accelerator.is_main_process:
        evals.append({"epoch": state.epochs_completed, "global_step": state.global_step, **values, "summary": summary})
        comps.tracker.log(values | {"eval_epochs_trained": state.epochs_completed}, step=state.global_step)
    shown = ", ".join(
        f"{k[5:]} {v:.3f}" for k, v in values.items() if not k.endswith(("_ci_low", "_ci_high", "_time_s"))
    )
    log.info("eval after %d epoch(s): %s (%.1fs)", state.epochs_completed, shown, values["eval_time_s"])
    return values | {"eval_epochs_trained": state.epochs_completed}


# -- the loop -------------------------------------------------------------------------------------
def train(comps: Components, run) -> float | None:
    """Run (or resume) the training described by ``run``; return the last epoch's mean reward."""
    accelerator, pipeline, plan = comps.accelerator, comps.pipeline, comps.plan
    t = run.train
    metrics = MetricsFile(comps.run_dir)
    state = TrainingState(algorithm=comps.algorithm)
    if comps.algorithm.needs_reference:
        pipeline.keep_reference()  # before training moves the weights

    optimizer = torch.optim.AdamW(
        pipeline.trainable_parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    model, optimizer = accelerator.prepare(pipeline.trainable_module(), optimizer)
    pipeline.use_wrapped(model)
    register_weight_hooks(accelerator, pipeline)

    resume = comps.resume or plan_resume(comps.run_dir, run.resume_from)
    if comps.resume is None:
        check_resume(resume, comps.record, run.num_epochs)
    if resume.candidates or resume.damaged:
        loaded = load_checkpoint(accelerator, state, resume.candidates, resume.damaged)
        if comps.record is not None and loaded != resume.candidates[0]:  # fell back: compare with that one
            comps.record.check_against(loaded, own_run=resume.own)
        log.info("resumed from %s: %d epoch(s) done, global step %d", loaded, state.epochs_completed, state.global_step)
    final_dir = os.path.join(comps.run_dir, "final")
    if state.epochs_completed >= run.num_epochs:
        log.info(
            "run in %s is already complete (%d of num_epochs=%d); nothing to do",
            comps.run_dir,
            state.epochs_completed,
            run.num_epochs,
        )
        if accelerator.is_main_process and not os.path.isdir(final_dir):  # killed while writing it
            log.warning("%s is missing: writing it from the last checkpoint", final_dir)
            write_final(pipeline, final_dir)
        accelerator.wait_for_everyone()
        if comps.run_lock is not None:
            comps.run_lock.release()
        records = metrics.read()
        return records[-1]["reward_mean"] if records else None
    evals = MetricsFile(comps.run_dir, EVAL_FILE)
    if accelerator.is_main_process:
        metrics.keep_epochs_before(state.epochs_completed)
        evals.keep_epochs_before(state.epochs_completed)
        if comps.record is not None:
            comps.record.append_history(state.epochs_completed)
    log.info("%s; %s", plan.summary(run), comps.algorithm.describe(plan.samples_per_epoch))
    if comps.evaluator is not None and comps.evaluator.due(state.epochs_completed, run.num_epochs):
        run_evaluation(comps, evals, state)  # the policy the first epoch starts from (the base model on a new run)

    last_reward = None
    executor = reward_executor(accelerator.device)
    preemption = PreemptionGuard(run.preemption_grace_s).install()
    # SIGTERM (scancel, a scheduler, kill) outside submitit: checkpoint at the end of the epoch, then stop
    termination = (
        None
        if os.environ.get("SUBMITIT_EXECUTOR")
        else PreemptionGuard(run.preemption_grace_s, signal.SIGTERM).install()
    )
    epoch = state.epochs_completed

    def stop_waiting_for_rewards() -> None:
        """SIGTERM came while the loop waits for a reward (a hung server): give up after half the grace
        period, leaving the other half to stop cleanly; the epoch is lost, its predecessors are saved."""
        signalled = termination.received_at if termination is not None else None
        if signalled is not None and time.monotonic() - signalled > run.preemption_grace_s / 2:
            abandon_reward(comps.reward_fn)
            done = list_checkpoints(comps.run_dir)
            since = f"from the checkpoint after epoch {done[-1][0] - 1}" if done else "from the start"
            raise Interrupted(
                f"terminated (SIGTERM) while waiting for the reward {comps.reward_name} in epoch {epoch} (still "
                f"pending {run.preemption_grace_s / 2:.0f} s after the signal): this epoch is lost; rerun the same "
                f"command to resume ({since})",
                exit_code=128 + signal.SIGTERM,
            )

    try:
        for epoch in range(state.epochs_completed, run.num_epochs):
            started = time.perf_counter()
            samples = sample_epoch(comps, run, epoch, executor, stop_waiting_for_rewards)
            advantages, all_rewards, all_info, all_prompts = compute_advantages(comps, samples)
            train_started = time.perf_counter()
            train_stats = train_epoch(comps, run, epoch, samples.batch, advantages, optimizer, model, state)
            train_s = time.perf_counter() - train_started
            check_finite_training(train_stats, epoch, comps.run_dir)
            check_finite_weights(pipeline, epoch, comps.run_dir)
            state.epochs_completed = epoch + 1
            elapsed = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "global_step": state.global_step,
                "reward_mean": float(all_rewards.mean()),
                "reward_std": float(all_rewards.std()),
                "num_samples": int(all_rewards.size),
                **{f"reward_{k}_mean": finite_mean(v) for k, v in all_info.items()},
                **train_stats,
                "sample_time_s": samples.sample_s,
                "reward_time_s": samples.reward_s,
                "reward_wait_s": samples.reward_wait_s,
                "train_time_s": train_s,
                "epoch_time_s": elapsed,
                "samples_per_s": all_rewards.size / elapsed,
            }
            record.update(comps.algorithm.stats())
            if comps.evaluator is not None and comps.evaluator.due(state.epochs_completed, run.num_epochs):
                record.update(run_evaluation(comps, evals, state))
            last_reward = record["reward_mean"]
            hook_error = None
            if accelerator.is_main_process:
                append_record(metrics, record, comps.run_dir)
                comps.tracker.log(
                    {k: v for k, v in record.items() if k != "epoch" and v is not None} | {"epoch": epoch},
                    step=state.global_step,
                )
                comps.tracker.log_epoch_rewards(all_rewards, all_prompts, step=state.global_step, epoch=epoch)
                hook_error = run_image_hook(comps, samples.batch_images, state.global_step, epoch)
            log.info(
                "epoch %d/%d  reward %.4f ± %.4f  loss %.3g  kl %.2g  clipfrac %.3f  %.1fs",
                epoch + 1,
                run.num_epochs,
                record["reward_mean"],
                record["reward_std"],
                record["loss"],
                record["approx_kl"],
                record["clipfrac"],
                elapsed,
            )
            # signals (any rank) and a failed hook are answered here: checkpoint, then requeue or stop
            unfinished = state.epochs_completed < run.num_epochs
            preempted = preemption.requested(accelerator) and unfinished
            terminated = termination is not None and termination.requested(accelerator) and unfinished
            hook_failed = any_rank(accelerator, hook_error is not None)
            if (
                preempted
                or terminated
                or hook_failed
                or state.epochs_completed % run.save_freq == 0
                or state.epochs_completed == run.num_epochs
            ):
                save_checkpoint(comps, run, state)
                if accelerator.is_main_process:
                    plot_reward_curve(
                        metrics.read(), os.path.join(comps.run_dir, "reward_curve.png"), title=comps.reward_name
                    )
            if hook_failed:
                raise DDPOError(
                    f"{hook_error or 'the image hook failed on the main process'} (the checkpoint of "
                    f"epoch {epoch} is saved: fix the hook and rerun the same command to resume)"
                )
            if terminated:
                raise Interrupted(
                    f"terminated (SIGTERM) during epoch {epoch}: its checkpoint is saved; rerun the "
                    "same command to resume",
                    exit_code=128 + signal.SIGTERM,
                )
            if preempted:
                preemption.hand_over()
        if accelerator.is_main_process:
            files = write_final(pipeline, final_dir)
            log.info("trained weights: %s", ", ".join(files))
        accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        abandon_reward(comps.reward_fn)
        done = list_checkpoints(comps.run_dir)
        since = f"from the checkpoint after epoch {done[-1][0] - 1}" if done else "from the start"
        raise Interrupted(
            f"interrupted during epoch {epoch}; rerun the same command to resume ({since})", exit_code=130
        ) from None
    finally:
        preemption.uninstall()
        if termination is not None:
            termination.uninstall()
        executor.shutdown()
        comps.tracker.finish()
        if comps.run_lock is not None:
            comps.run_lock.release()
    return last_reward
