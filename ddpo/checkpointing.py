"""Checkpoints: the loop's state, saving and publishing them whole, finding and checking what to
resume from, and writing the final weights.

A checkpoint is accelerate's ``save_state`` (trained weights in diffusers format through the
pipeline's hooks, optimizer, RNG) plus ``ddpo_state.json`` (epochs, step, the algorithm's state,
as JSON: never a pickle) and the config that trained it (``run_config.json``).
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

from ddpo.algorithms import Algorithm
from ddpo.config_history import RunRecord
from ddpo.errors import ConfigError, DDPOError, WeightsMismatch
from ddpo.logging import METRICS_FILE, MetricsFile
from ddpo.pipelines.base import DDPOPipeline
from ddpo.sharding import full_weights, is_sharded

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"

STATE_FILE = "ddpo_state.json"
FINAL_DIR = "final"  # the exported weights of a finished run, in the run directory

MAX_STATE_BYTES = 64 << 20  # a loop state is KBs (per-prompt statistics: 16 numbers a prompt)


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


def save_checkpoint(comps, run, state: TrainingState) -> str:
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
        with quiet_accelerate_info():  # its INFO lines name every file with an absolute path: one line below
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
        log.info("checkpoint %s saved (epoch %d)", os.path.relpath(final, comps.run_dir), state.epochs_completed)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def quiet_accelerate_info():
    """Drop accelerate's INFO records while the block runs (its warnings and errors still pass)."""

    class BelowInfo(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.levelno > logging.INFO

    quiet = BelowInfo()
    names = ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.fsdp_utils")
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


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
    """Checkpoints hold only the trained weights, in diffusers format (``pipeline.save_trained``).

    Under FSDP accelerate saves and loads the sharded model itself (what a resume reads); the hooks add
    the gathered diffusers export and the shadows (``ddpo.sharding``)."""
    sharded = is_sharded(accelerator)

    def save_hook(models, weights, output_dir):
        with full_weights(accelerator, pipeline) as writes:  # sharded: every process gathers
            if writes:
                pipeline.save_trained(output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        if sharded:  # the trained module's shards are accelerate's to load
            pipeline.load_shadows(input_dir)
        else:
            pipeline.load_trained(input_dir)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_final(pipeline: DDPOPipeline, final_dir: str, accelerator=None) -> list[str]:
    """Export the trained weights to ``final_dir`` atomically: whole, or not there at all.

    Called on the main process, or under FSDP on every process (which gather the weights; the main one
    writes them). A full disk removes the partial export and stops with one line: the last checkpoint
    holds the same weights, and the rerun writes ``final_dir`` from it.
    """
    tmp = final_dir + ".partial"
    full = (
        f"the disk is full: the trained weights could not be written to {final_dir} (the partial copy is removed; "
        "the last checkpoint holds the same weights). Free space and rerun the same command: it writes final/ "
        "from the last checkpoint"
    )
    # the EMA's weights if the run keeps one
    with pipeline.ema_weights(), full_weights(accelerator, pipeline) as writes:
        if not writes:
            return []
        shutil.rmtree(tmp, ignore_errors=True)
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
            f"the disk is full: the record of epoch {record['epoch'] + 1} could not be appended to {metrics.path} "
            f"(checkpoints in {os.path.join(run_dir, CHECKPOINT_DIR)} are intact). Free space and rerun the same "
            "command to resume"
        ) from None
