"""One process per run directory: an advisory lock held for the life of a run.

Two runs writing one directory would interleave their epochs in ``metrics.jsonl`` and overwrite
each other's checkpoints. The main process of a run holds an exclusive ``flock`` on
``<run dir>/.lock`` (the other ranks of the same run do not take it); the kernel drops the lock when
the process ends, however it ends, so a crashed run never leaves a stale lock behind.
"""

import datetime
import fcntl
import os
import socket

from ddpo.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> "RunLock":
        """Take the lock, or stop with one line naming the process that holds it."""
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"run directory {os.path.dirname(self.path)} is in use by {holder}; wait for that run to end, "
                "or give this one another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
