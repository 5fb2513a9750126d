"""What a researcher sees of a run: the log's checkpoint lines (and, as they land, progress and the start-up summary)."""

import re

import pytest

from tests.conftest import TINY, run_cli


def test_each_checkpoint_is_one_line_relative_to_the_run_directory(tmp_path):
    """save_freq=1 over 2 epochs: two checkpoint lines, each naming checkpoints/checkpoint_<n> relative to the run;
    none of accelerate's per-file INFO lines with absolute paths (three per checkpoint before)."""
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*TINY, "save_freq=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    lines = [line for line in log.splitlines() if "checkpoint_0000" in line]
    assert len(lines) == 2, lines
    for epoch, line in zip((1, 2), lines):
        assert re.search(rf"checkpoint checkpoints/checkpoint_0000{epoch} saved \(epoch {epoch}\)", line), line
    assert str(run_dir) not in "\n".join(lines)
    assert "Saving current state" not in log and "saved in" not in log


def run_on_a_terminal(run_dir, overrides, timeout=300) -> str:
    """``python train.py`` with stdout and stderr on a pseudo-terminal, as in an interactive shell; its output."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    import time

    from tests.conftest import ROOT

    leader, follower = pty.openpty()
    # a terminal 160 columns wide (a fresh pseudo-terminal has none, and tqdm sizes its bar to the terminal)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_the_runs_progress_bar_and_the_log_file_stays_plain(tmp_path):
    run_dir = tmp_path / "run"
    out = run_on_a_terminal(run_dir, [*TINY, "num_epochs=3"])
    # the run's bar: epochs done / total, elapsed < remaining (the ETA), the rate, and the phase
    bars = re.findall(r"run: (\d)/3 epochs \|[^|]*\| [0-9:]+<([0-9:?]+), [^\r\n]*", out)
    assert [n for n, _ in bars][-1] == "3" and any(eta != "?" for _, eta in bars), bars
    assert "epoch 1: sampling" in out and "epoch 3: training" in out  # the inner bars count from 1, like the log
    assert "epoch 3/3" in out
    log = (run_dir / "train.log").read_text()
    assert "epoch 3/3" in log and "ETA" in log and "epochs |" not in log
    assert "\r" not in log and "\x1b" not in log and "█" not in log


def test_no_bar_off_a_terminal_only_plain_lines_with_the_eta(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*TINY, "num_epochs=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "\r" not in output and "█" not in output and "epochs |" not in output
    lines = [line for line in output.splitlines() if re.search(r"epoch \d/3 ", line)]
    assert len(lines) == 3 and all("ETA" in line or line.rstrip().endswith("done") for line in lines), lines
    assert lines[-1].rstrip().endswith("done")


ITEMS = ("model", "pipeline", "algorithm", "reward", "prompts", "weights", "device", "batches", "run", "resume")


def summary_of(log: str) -> dict[str, str]:
    """The start-up summary's lines of a train.log, by their first word."""
    messages = [line.split("] - ", 1)[1] for line in log.splitlines() if "] - " in line]
    return {m.split()[0]: m for m in messages if m.split() and m.split()[0] in ITEMS}


def test_the_start_up_summary_names_every_item(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "use_lora=true", "lora_rank=4", "algorithm=grpo", "algorithm.group_size=2"]
    result = run_cli(run_dir, [*overrides, "num_epochs=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of((run_dir / "train.log").read_text())
    assert set(summary) == set(ITEMS), summary
    assert "tiny (ddpo.models.tiny_model)" in summary["model"]
    assert "StableDiffusionPipeline" in summary["model"] and "family ddim" in summary["model"]
    assert "ddim (" in summary["pipeline"] and "3 steps" in summary["pipeline"] and "eta" in summary["pipeline"]
    assert "grpo (ddpo.algorithms.GRPO)" in summary["algorithm"]
    assert "jpeg_compressibility" in summary["reward"] and "animals" in summary["prompts"]
    assert "trainable of" in summary["weights"] and "LoRA rank 4" in summary["weights"]
    assert "cpu x 1 process(es)" in summary["device"] and "float32" in summary["device"]
    assert "world size 1" in summary["batches"]
    assert str(run_dir) in summary["run"] and "new run: 1 epochs to train" in summary["resume"]
    assert "2 prompts x 2 samples (GRPO groups)" in summary["batches"]


@pytest.mark.slow  # CI's budget: two more runs
def test_the_start_up_summary_says_when_a_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, [*TINY, "num_epochs=1"]).returncode == 0
    result = run_cli(run_dir, [*TINY, "num_epochs=2"])  # one more epoch: it resumes
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume     resumed: 1 of 2 epochs done" in (run_dir / "train.log").read_text()


def test_help_lists_every_group_with_its_options_and_the_keys_with_their_comments():
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for group in ("model", "pipeline", "algorithm", "reward", "prompt", "logger", "experiment", "launcher"):
        assert f"\n  {group}:\n" in text, group
        for option in (ROOT / "conf" / group).glob("*.yaml"):
            assert re.search(rf"\n    {re.escape(option.stem)} +\S", text), option  # each option, with its line
    assert re.search(r"\n    tiny_flux +A tiny random FLUX\.1 pipeline built locally", text)
    assert re.search(r"\n  sample\.num_steps = 50 +DDIM denoising steps per image", text)
    assert re.search(r"\n  eval\.every = 0 +\S", text)
    assert "--hydra-help" in text and "Hydra" in text
