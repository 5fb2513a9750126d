"""Faults outside checkpointing end in one line and lose nothing: a reward that never returns (Ctrl-C
and SIGTERM still stop the run), and a disk that fills while the run appends to metrics.jsonl or
writes final/ (real small tmpfs mounts where root may mount them)."""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ddpo.errors import DDPOError
from tests.conftest import TINY, read_metrics, run_cli, run_in_process, start_cli

HANG = "reward._target_=tests.fixtures.bad_rewards.HangOnCall"
FILL = "reward._target_=tests.fixtures.bad_rewards.FillDiskOnCall"


@pytest.mark.parametrize(
    "signum, code, words",
    [
        (signal.SIGTERM, 143, "terminated (SIGTERM) while waiting for the reward"),
        (signal.SIGINT, 130, "interrupted during epoch 2"),  # the second epoch (counted from 1)
    ],
)
def test_a_signal_stops_a_run_whose_reward_never_returns(tmp_path, signum, code, words):
    run_dir, marker = tmp_path / "run", tmp_path / "hanging"
    grace = 4
    # the first batch of epoch 1 hangs
    hanging = [*TINY, HANG, "+reward.hang_on_call=2", f"+reward.marker={marker}", f"preemption_grace_s={grace}"]
    process = start_cli(run_dir, hanging)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "the run never reached the hanging reward call"
        time.sleep(1)  # the loop is now waiting for that reward
        sent = time.monotonic()
        process.send_signal(signum)
        try:
            _, stderr = process.communicate(timeout=grace + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not stop within {grace + 60} s of the signal")
        waited = time.monotonic() - sent
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and "rerun the same command" in last, last
    assert waited < grace + 30, waited
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]  # epoch 0 kept, with its checkpoint
    assert (run_dir / "checkpoints" / "checkpoint_00001").is_dir()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def on_disk(path: Path) -> int:
    """Bytes a directory takes on tmpfs (whole 4 KB pages per file)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


def test_a_full_disk_while_appending_metrics_is_one_line_and_resumes(small_disk):
    run_dir = small_disk / "run"
    # the first reward call of epoch 1 fills the disk: its record cannot be appended
    pad = f"+reward.pad={run_dir / 'metrics.jsonl'}"
    result = run_cli(run_dir, [*TINY, FILL, "+reward.fill_on_call=2", f"+reward.path={small_disk}", pad])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk is full: the record of epoch 2") and "metrics.jsonl" in last, last
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0]
    (small_disk / "filler").unlink()
    resumed = run_cli(run_dir, [*TINY, FILL, "+reward.fill_on_call=-1", f"+reward.path={small_disk}", pad,
                                "resume_with_changes=true"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [0, 1]


def test_a_full_disk_while_writing_final_is_one_line_and_the_rerun_writes_it(small_disk, tmp_path):
    full = [*TINY, "use_lora=false"]  # final/ (the UNet) is a third of a checkpoint (UNet + Adam's two moments)
    probe = tmp_path / "probe"  # how much one checkpoint of this run takes
    assert run_cli(probe, [*full, "num_epochs=1"]).returncode == 0
    checkpoint_bytes = on_disk(probe / "checkpoints" / "checkpoint_00001")
    final_bytes = on_disk(probe / "final")
    run_dir = small_disk / "run"
    # the last epoch's first reward call leaves room for its checkpoint, not for final/ as well
    leave = checkpoint_bytes + final_bytes // 2
    result = run_cli(
        run_dir,
        [*full, FILL, "+reward.fill_on_call=2", f"+reward.path={small_disk}", f"+reward.leave_bytes={leave}"],
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk is full: the trained weights could not be written"), last
    assert not (run_dir / "final").exists() and not (run_dir / "final.partial").exists()
    assert (run_dir / "checkpoints" / "checkpoint_00002").is_dir()
    (small_disk / "filler").unlink()
    rerun = run_cli(run_dir, [*full, FILL, "+reward.fill_on_call=2", f"+reward.path={small_disk}",
                              f"+reward.leave_bytes={leave}"])  # fmt: skip
    assert rerun.returncode == 0 and "writing it from the last checkpoint" in rerun.stdout + rerun.stderr
    assert (run_dir / "final" / "unet" / "config.json").is_file()


def test_a_full_disk_while_writing_final_is_one_line_anywhere(tmp_path, monkeypatch):
    """The same path without a mount: the export meets ENOSPC."""
    from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline

    def full(self, directory):
        os.makedirs(directory, exist_ok=True)
        (Path(directory) / "half_written").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    original = StableDiffusionDDPOPipeline.export
    monkeypatch.setattr(StableDiffusionDDPOPipeline, "export", full)
    monkeypatch.setattr(StableDiffusionDDPOPipeline, "save_trained", lambda self, d: original(self, d))
    with pytest.raises(DDPOError, match="the disk is full: the trained weights could not be written") as error:
        run_in_process(tmp_path, TINY)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.partial").exists()


def test_the_reward_thread_ends_with_the_run_unless_a_call_hangs():
    """An idle reward thread is joined when the run ends (one still ending while the interpreter exits
    can abort the process in torch's C++ teardown); one inside a hung call does not hold the run."""
    import threading

    from ddpo.reward_calls import RewardWorker

    idle = RewardWorker("cpu")
    assert idle.submit(sum, [1, 2]).result(timeout=10) == 3
    idle.shutdown()
    assert not idle.alive

    release = threading.Event()
    hung = RewardWorker("cpu")
    future = hung.submit(release.wait)
    while not future.running():
        time.sleep(0.01)
    started = time.monotonic()
    hung.shutdown()
    assert time.monotonic() - started < 1 and hung.alive
    release.set()
    assert future.result(timeout=10) is True
