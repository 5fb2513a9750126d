"""Helpers of the scale-out tests: Hydra multiruns and multi-process launches in subprocesses."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, read_metrics


def subprocess_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def multirun(sweep_dir, overrides, env=None, timeout=300, wait=True):
    """``python train.py -m <overrides> hydra.sweep.dir=<sweep_dir>``; a Popen when not ``wait``."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    if not wait:
        log = open(Path(sweep_dir).parent / f"{Path(sweep_dir).name}.launcher.log", "w")
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def failure_report(result, sweep_dir=None) -> str:
    """The launcher's output and, for a sweep, the tail of every job's submitit error log."""
    parts = [f"exit {result.returncode}", result.stdout[-3000:], result.stderr[-3000:]]
    if sweep_dir is not None:
        for err in sorted(Path(sweep_dir).glob(".submitit/*/*_log.err")):
            parts.append(f"--- {err}\n{err.read_text()[-3000:]}")
    return "\n".join(parts)


def epochs(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r["epoch"] for r in read_metrics(run_dir)] if path.exists() else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, poll: float = 0.25, process=None):
    """Poll ``condition`` until it is true; fail with ``what`` after ``timeout`` s or if ``process`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {process.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def kill_tree(process) -> None:
    """End a launcher started by a test, and what it started, if it is still running."""
    if process.poll() is None:
        for child in children(process.pid):
            for grandchild in children(child):
                _kill(grandchild)
            _kill(child)
        _kill(process.pid)
        process.wait(timeout=30)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
