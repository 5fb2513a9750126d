"""kill -9 at any moment, and damaged checkpoints: every rerun of the same command ends as if nothing happened.

End to end with real processes (``python train.py ...``), as a user runs them:

(a) A reference run goes uninterrupted. The same run, in a fresh directory, is killed with SIGKILL at
    each of 8 moments (during sampling, mid-training, between a metrics line and its checkpoint,
    while a checkpoint's ``.partial`` exists, right after a checkpoint is published, while
    ``final.partial`` exists, right after ``final/`` appears, during the last epoch's reward), then
    the same command is rerun. Each must exit 0 with metrics.jsonl holding epochs 0..N-1 once, every
    number (but timings) equal to the reference's, and ``final/`` byte-equal to the reference's.
    One more case kills the rerun too, while it rebuilds ``final/`` (a fault during the recovery).
    Results are bit-exact only at one thread count: every run here has OMP_NUM_THREADS=1.
(b) The newest checkpoint of a finished run is damaged in 10 ways; the rerun falls back to the
    previous checkpoint with a warning naming the damage (and then ends bit-exact), resumes with a
    warning, or stops with one ``error:`` line. No older checkpoint is ever deleted or changed, and
    with every checkpoint damaged the run stops in one line naming each of them.

Full fine-tuning (``use_lora=false``): checkpoints and ``final/`` hold the diffusers ``unet/``
directory (the bigger files, resumed through ``from_pretrained``); the LoRA path is covered in
process by test_faults.py and test_resume.py. Two prompts with ``min_count=2`` make the advantages
depend on the restored per-prompt reward buffers, and ``checkpoints_total_limit=3`` makes pruning
run while the reruns save.

The moments are reached deterministically: ``tests/fixtures/kill_points.py`` (selected as the
reward, same values as ``reward=jpeg_compressibility``, so every run of a test is the same command)
holds the process at the moment named by DDPO_KILL_POINT and writes a marker; the test then checks
the files on disk and sends SIGKILL. The tiny epochs last ~0.3 s and a checkpoint's ``.partial``
directory exists for ~20 ms, too short to hit reliably by polling alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, read_metrics

pytestmark = pytest.mark.slow

N = 4  # epochs
TWO_PROMPTS = os.path.join(os.path.dirname(__file__), "fixtures", "two_prompts.txt")
RUN = [
    *TINY,
    f"num_epochs={N}",
    "use_lora=false",
    "checkpoints_total_limit=3",
    "prompt=from_file",
    f"prompt.path={TWO_PROMPTS}",
    "per_prompt_stat_tracking.min_count=2",
    "per_prompt_stat_tracking.buffer_size=3",
    "reward._target_=tests.fixtures.kill_points.JpegWithKillPoints",
]
ENV = {
    "OMP_NUM_THREADS": "1",  # bit-exactness holds at one thread count: the same for every run here
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}
TIMINGS = {"sample_time_s", "reward_time_s", "reward_wait_s", "train_time_s", "epoch_time_s", "samples_per_s"}
CHECKPOINTS = "checkpoints"
TIMEOUT = 300

RESULTS: dict[str, str] = {}  # what each case did, printed at the end of the module


def checkpoint(run_dir: Path, epochs: int) -> Path:
    return run_dir / CHECKPOINTS / f"checkpoint_{epochs:05d}"


def environment(extra=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPO_KILL_")}
    return {**env, **ENV, **(extra or {})}


def command(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}"]


def run_train(run_dir: Path) -> subprocess.CompletedProcess:
    """The run's command, to the end."""
    return subprocess.run(
        command(run_dir), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=TIMEOUT
    )


def kill_at(run_dir: Path, point: str, at_kill: Callable[[Path], None], logs: Path) -> None:
    """Start the run's command, wait until it holds at ``point``, check the files, kill -9 it."""
    marker = logs / f"{point.replace(':', '_')}.reached"
    marker.unlink(missing_ok=True)
    out = open(logs / f"{point.replace(':', '_')}.killed.log", "w")
    process = subprocess.Popen(
        command(run_dir),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment({"DDPO_KILL_POINT": point, "DDPO_KILL_MARKER": str(marker)}),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert process.poll() is None, (
                f"the run ended (exit {process.returncode}) before reaching "
                f"{point}:\n{Path(out.name).read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"{point} not reached in {TIMEOUT} s"
            time.sleep(0.05)
        at_kill(run_dir)  # what is on disk at the moment of the kill
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close()


def rerun_until_done(run_dir: Path, attempts: int = 3) -> list[subprocess.CompletedProcess]:
    """Rerun the same command until it exits 0 (at most ``attempts`` times)."""
    results = []
    for _ in range(attempts):
        result = run_train(run_dir)
        results.append(result)
        assert "Traceback" not in output(result), output(result)[-3000:]
        if result.returncode == 0:
            break
        assert_one_error_line(result)
    return results


def output(result: subprocess.CompletedProcess) -> str:
    """What the run printed: its log goes to stdout, tracebacks and the final error line to stderr."""
    return result.stdout + result.stderr


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in output(result), output(result)[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def tree_digest(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory``."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def partials(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.partial")]


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    """Epochs 0..N-1 once each, every number but timings equal, final/ and the last checkpoint's weights byte-equal."""
    records, expected = read_metrics(run_dir), read_metrics(reference)
    assert [r["epoch"] for r in records] == list(range(N)), "an epoch is missing or repeated"
    for record, ref in zip(records, expected):
        assert set(record) == set(ref), record["epoch"]
        differ = {k: (record[k], ref[k]) for k in ref if k not in TIMINGS and record[k] != ref[k]}
        assert not differ, f"epoch {record['epoch']} differs from the uninterrupted run: {differ}"
    final = tree_digest(run_dir / "final")
    assert final and final == tree_digest(reference / "final"), "final/ differs from the uninterrupted run's"
    last = checkpoint(run_dir, N) / "unet"
    assert tree_digest(last) == tree_digest(checkpoint(reference, N) / "unet"), f"{last} differs"
    assert sorted(os.listdir(run_dir / CHECKPOINTS)) == sorted(os.listdir(reference / CHECKPOINTS))
    assert not partials(run_dir), f"left behind: {partials(run_dir)}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run, uninterrupted (checkpoints 2, 3 and 4 kept: checkpoints_total_limit=3)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(run_dir)
    assert result.returncode == 0, output(result)[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(N))
    assert sorted(os.listdir(run_dir / CHECKPOINTS)) == [f"checkpoint_{e:05d}" for e in (2, 3, 4)]
    return run_dir


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Print what each case did (``pytest -s`` shows it)."""
    yield
    if RESULTS:
        width = max(map(len, RESULTS))
        print("\n" + "\n".join(f"{name:<{width}}  {what}" for name, what in RESULTS.items()))


def brief(text: str, run_dir: Path, limit: int = 220) -> str:
    """``text`` with the run directory written <run> and the log prefix dropped, cut to ``limit`` characters."""
    text = text.replace(str(run_dir), "<run>").split("] - ", 1)[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- (a) kill -9 at 8 moments -------------------------------------------------------------------
def epochs_on_disk(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def checkpoints_on_disk(run_dir: Path) -> list[str]:
    root = run_dir / CHECKPOINTS
    return sorted(os.listdir(root)) if root.is_dir() else []


def names(*epochs: int) -> list[str]:
    return [f"checkpoint_{e:05d}" for e in epochs]


@dataclass
class Moment:
    point: str
    at_kill: Callable[[Path], None]  # asserts what is on disk when the kill lands
    resumes: int | str | None  # the checkpoint (its epochs) the rerun resumes from, or what it says; None: afresh


def state(metrics: list[int], checkpoints: list[str], final: bool = False, final_partial: bool = False):
    def check(run_dir: Path) -> None:
        assert epochs_on_disk(run_dir) == metrics
        assert checkpoints_on_disk(run_dir) == checkpoints
        assert (run_dir / "final").is_dir() == final
        assert (run_dir / "final.partial").is_dir() == final_partial

    return check


def resumed_from(run_dir: Path, epochs: int) -> str:
    return f"resumed from {checkpoint(run_dir, epochs)}"


MOMENTS = {
    # nothing saved yet: the reward of batch 0 runs while batch 1 samples
    "during_epoch0_sampling": Moment("reward:0", state([], []), resumes=None),
    # one optimizer step of epoch 1 taken in memory; checkpoint_00001 on disk
    "during_epoch1_training": Moment("train:1", state([0], names(1)), resumes=1),
    # epoch 2's metrics line written, its checkpoint not yet: the line is dropped and epoch 2 redone
    "metrics_written_before_checkpoint": Moment("metrics:2", state([0, 1, 2], names(1, 2)), resumes=2),
    # checkpoint_00003.partial complete (state file included) but not renamed: it must not be used
    "checkpoint_partial_exists": Moment(
        "checkpoint_partial:3", state([0, 1, 2], names(1, 2) + ["checkpoint_00003.partial"]), resumes=2
    ),
    # checkpoint_00002 published, epoch 2 not started
    "checkpoint_just_published": Moment("checkpoint:2", state([0, 1], names(1, 2)), resumes=2),
    # training done, final.partial complete but not renamed: the rerun writes final/ from the last checkpoint
    "final_partial_exists": Moment(
        "final_partial",
        state([0, 1, 2, 3], names(2, 3, 4), final_partial=True),
        resumes="is missing: writing it from the last checkpoint",
    ),
    # final/ published, the process not yet ended: the rerun says it is complete
    "final_just_published": Moment(
        "final", state([0, 1, 2, 3], names(2, 3, 4), final=True), resumes="already complete"
    ),
    # the reward of the last epoch's first batch: epochs 0-2 and checkpoint_00003 on disk
    "during_last_epoch_reward": Moment("reward:6", state([0, 1, 2], names(1, 2, 3)), resumes=3),
}


@pytest.mark.parametrize("name", list(MOMENTS))
def test_killed_at_any_moment_resumes_bit_exact(name, reference, tmp_path):
    moment = MOMENTS[name]
    run_dir = tmp_path / "run"
    kill_at(run_dir, moment.point, moment.at_kill, tmp_path)

    results = rerun_until_done(run_dir)
    assert results[-1].returncode == 0, output(results[-1])[-3000:]
    assert len(results) == 1, f"{len(results)} reruns were needed"
    said = output(results[0])
    if moment.resumes is None:
        assert "resumed from" not in said, said[-3000:]
    else:
        expected = resumed_from(run_dir, moment.resumes) if isinstance(moment.resumes, int) else moment.resumes
        assert expected in said, said[-3000:]
    assert_same_as_reference(run_dir, reference)
    RESULTS[f"kill -9 {name} ({moment.point})"] = "resumed, bit-exact"


def test_killed_again_while_rebuilding_final_resumes_bit_exact(reference, tmp_path):
    """A second kill -9 during the recovery itself: the rerun that rebuilds final/ dies while final.partial exists."""
    run_dir = tmp_path / "run"
    rebuilding = state([0, 1, 2, 3], names(2, 3, 4), final_partial=True)
    kill_at(run_dir, "final_partial", rebuilding, tmp_path)
    kill_at(run_dir, "final_partial", rebuilding, tmp_path)  # the "already complete" path, killed in turn
    results = rerun_until_done(run_dir)
    assert [r.returncode for r in results] == [0], output(results[-1])[-3000:]
    assert "is missing: writing it from the last checkpoint" in output(results[0])
    assert_same_as_reference(run_dir, reference)
    RESULTS["kill -9 twice (final_partial, then again in the rebuild)"] = "resumed, bit-exact"


# -- (b) damaged checkpoints --------------------------------------------------------------------
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def damage_truncated_weights(ckpt: Path) -> str:
    truncate(ckpt / WEIGHTS)
    return "checkpoint_00004"


def damage_zero_byte_weights(ckpt: Path) -> str:
    (ckpt / WEIGHTS).write_bytes(b"")
    return "checkpoint_00004"


def damage_no_unet_dir(ckpt: Path) -> str:
    shutil.rmtree(ckpt / "unet")
    return "checkpoint_00004"


def damage_no_optimizer(ckpt: Path) -> str:
    (ckpt / "optimizer.bin").unlink()
    return "checkpoint_00004"


def damage_truncated_optimizer(ckpt: Path) -> str:
    truncate(ckpt / "optimizer.bin")
    return "checkpoint_00004"


def damage_no_state(ckpt: Path) -> str:
    (ckpt / "ddpo_state.json").unlink()
    return "checkpoint_00004/ddpo_state.json"


def damage_garbage_state(ckpt: Path) -> str:
    (ckpt / "ddpo_state.json").write_bytes(b"\x00\xffnot json{")
    return "checkpoint_00004/ddpo_state.json"


def damage_no_rng(ckpt: Path) -> str:
    (ckpt / "random_states_0.pkl").unlink()
    return "checkpoint_00004/random_states_0.pkl"


def damage_empty_dir(ckpt: Path) -> str:
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    return "checkpoint_00004"


def damage_stray_partial(ckpt: Path) -> str:
    """A half-written checkpoint of a later epoch (a run killed while saving it), claiming to be newer."""
    stray = ckpt.parent / "checkpoint_00005.partial"
    stray.mkdir()
    (stray / "ddpo_state.json").write_text(json.dumps({"epochs_completed": 5, "global_step": 10}))
    (stray / "optimizer.bin").write_bytes(b"half")
    return ""


CORRUPTIONS = {
    "truncated_unet_weights": damage_truncated_weights,
    "zero_byte_unet_weights": damage_zero_byte_weights,
    "missing_unet_dir": damage_no_unet_dir,
    "missing_optimizer": damage_no_optimizer,
    "truncated_optimizer": damage_truncated_optimizer,
    "missing_state": damage_no_state,
    "garbage_state": damage_garbage_state,
    "missing_rng_file": damage_no_rng,
    "empty_checkpoint_dir": damage_empty_dir,
    "stray_partial_dir": damage_stray_partial,
}


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if "WARNING" in line]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_newest_checkpoint_falls_back_or_stops_in_one_line(name, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = checkpoint(run_dir, N)
    damaged = CORRUPTIONS[name](newest)
    older = {e: tree_digest(checkpoint(run_dir, e)) for e in (2, 3)}

    result = run_train(run_dir)

    assert "Traceback" not in output(result), output(result)[-3000:]
    for e, digest in older.items():  # nothing older is lost or touched, whatever the outcome
        assert checkpoint(run_dir, e).is_dir() and tree_digest(checkpoint(run_dir, e)) == digest, (
            f"checkpoint_{e:05d} was deleted or changed"
        )
    if result.returncode != 0:
        line = assert_one_error_line(result)
        assert damaged in line, line
        RESULTS[f"corruption {name}"] = f"stopped in one line: {brief(line, run_dir)}"
        return
    said = output(result)
    warned = [w for w in warnings_in(said) if damaged in w]
    if resumed_from(run_dir, N - 1) in said:  # fell back: the warning names the damage; epoch 3 redone, bit-exact
        assert warned, f"no warning names {damaged}:\n" + "\n".join(warnings_in(said))
        assert_same_as_reference(run_dir, reference)
        RESULTS[f"corruption {name}"] = "fell back to checkpoint_00003, bit-exact; warning: " + brief(
            warned[0], run_dir
        )
    else:  # the damage does not stop the newest checkpoint from loading: complete, nothing changed
        assert resumed_from(run_dir, N) in said and "already complete" in said, said[-3000:]
        if damaged:
            assert warned, f"no warning names {damaged}:\n" + "\n".join(warnings_in(said))
        assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(N))
        assert tree_digest(run_dir / "final") == tree_digest(reference / "final")
        RESULTS[f"corruption {name}"] = "resumed from checkpoint_00004 (complete)" + (
            f"; warning: {brief(warned[0], run_dir)}" if damaged else ", the stray directory ignored"
        )
    assert checkpoint(run_dir, N).is_dir()


@pytest.mark.parametrize("how", ["mixed", "all_states_unreadable"])
def test_every_checkpoint_damaged_stops_in_one_line_naming_each(how, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    if how == "mixed":
        damage_no_state(checkpoint(run_dir, 2))
        damage_garbage_state(checkpoint(run_dir, 3))
        damage_truncated_optimizer(checkpoint(run_dir, 4))
    else:
        for e in (2, 3, 4):
            damage_garbage_state(checkpoint(run_dir, e))
    before = tree_digest(run_dir)

    result = run_train(run_dir)

    line = assert_one_error_line(result)
    assert line.startswith("error: no checkpoint could be loaded"), line
    for e in (2, 3, 4):
        assert f"checkpoint_{e:05d}" in line, line
    after = tree_digest(run_dir)
    changed = {
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and k not in ("train.log", ".lock") and not k.startswith(".hydra")
    }
    assert not changed, f"files changed or lost: {sorted(changed)}"
    RESULTS[f"all checkpoints damaged ({how})"] = f"stopped in one line: {brief(line, run_dir, 400)}"
