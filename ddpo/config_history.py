"""What a run was trained with: its config in every checkpoint, and the history of its restarts.

Hydra rewrites ``<run>/.hydra/*.yaml`` at every start, before the run can look at them, so a run
keeps its own record:

- every checkpoint holds ``run_config.json``: the resolved config that trained it, and the
  ``.hydra/*.yaml`` files of the start that wrote it (to put back when a start is refused);
- ``<run>/config_history.jsonl`` gets one line per start of training: the epoch it starts at, its
  overrides, and what it changed.

Resuming with a config that differs from the checkpoint's in anything that shapes training (all but
``FREE_KEYS``) is refused with one line naming the changed keys, unless ``resume_with_changes=true``,
which records each change and the epoch it took effect. Keys that decide the shape of the trained
weights (``STRUCTURAL_KEYS``) cannot change at all: the checkpoint could not be loaded.
"""

from __future__ import annotations

import datetime
import json
import logging
import os

from ddpo.errors import ConfigError

log = logging.getLogger(__name__)

RECORD_FILE = "run_config.json"  # in every checkpoint
HISTORY_FILE = "config_history.jsonl"  # in the run directory
HYDRA_DIR = ".hydra"
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")
# what may differ between the starts of one run: how long it runs, how often and how much it keeps,
# where it logs; none of them changes a trained weight
FREE_KEYS = frozenset(
    {"num_epochs", "save_freq", "checkpoints_total_limit", "resume_from", "resume_with_changes", "preemption_grace_s"}
)
FREE_PREFIXES = ("logger.", "launcher.")
# the shape of the trained weights: a checkpoint trained with other values cannot be loaded
STRUCTURAL_KEYS = ("use_lora", "lora_rank", "pipeline._target_")
ABSENT = "<absent>"
# keys a later version added, with the value that trains as runs did before the key existed: a
# checkpoint recorded without the key compares as if it held that value
ADDED_KEYS = {"train.ema_decay": 0.0, "train.ema_every": 1}


def plain(value):
    """A resolved config as JSON types (an enum, e.g. mixed_precision, by its value)."""
    import enum

    return json.loads(json.dumps(value, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v)))


def flatten(node, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b.c": value}``; lists stay values."""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every key that shapes training and differs."""
    old_flat, new_flat = flatten(old), flatten(new)
    changes = {}
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
            continue
        before, after = old_flat.get(key, ADDED_KEYS.get(key, ABSENT)), new_flat.get(key, ABSENT)
        if before != after:
            changes[key] = (before, after)
    return changes


def describe(changes: dict[str, tuple], limit: int = 6) -> str:
    shown = [f"{key}: {short(a)} -> {short(b)}" for key, (a, b) in list(changes.items())[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(shown) + more


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class RunRecord:
    """The config of this start of a run, what it writes into checkpoints and the history."""

    def __init__(self, config: dict, run_dir: str, resume_with_changes: bool = False, is_main: bool = True):
        self.config = plain(config)  # resolved; as JSON reads it back, so that a reread compares equal
        self.run_dir = run_dir
        self.resume_with_changes = resume_with_changes
        self.is_main = is_main  # the process that writes the run directory's files
        self.hydra_files = {}  # name -> text, as Hydra wrote them for this start (absent in the compose API)
        for name in HYDRA_FILES:
            path = os.path.join(run_dir, HYDRA_DIR, name)
            if os.path.isfile(path):
                with open(path) as handle:
                    self.hydra_files[name] = handle.read()
        self.changes: dict[str, tuple] = {}
        self.source: str | None = None  # the checkpoint compared with

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, RECORD_FILE)
        with open(path, "w") as handle:
            json.dump({"config": self.config, "hydra_files": self.hydra_files}, handle)

    @staticmethod
    def read(checkpoint_dir: str) -> dict | None:
        """A checkpoint's record, or None for a checkpoint of an older version (or a damaged record)."""
        path = os.path.join(checkpoint_dir, RECORD_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as handle:
                record = json.load(handle)
            if not (isinstance(record, dict) and isinstance(record.get("config"), dict)):
                raise ValueError("not a config record")
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s): the config cannot be compared with it", path, exc)
            return None
        return record

    # -- the check at resume ----------------------------------------------------------------------
    def check_against(self, checkpoint_dir: str, own_run: bool) -> None:
        """Refuse (one line) to continue ``checkpoint_dir`` with a changed config, unless allowed.

        ``own_run``: the checkpoint is this run directory's (Hydra has just rewritten its ``.hydra``
        files, which are put back on refusal), not another run's (``resume_from``).
        """
        record = self.read(checkpoint_dir)
        self.source = checkpoint_dir
        if record is None:
            log.warning(
                "%s records no config (written by an older version): resuming without checking for changes",
                checkpoint_dir,
            )
            self.changes = {}
            return
        self.changes = config_changes(record["config"], self.config)
        if not self.changes:
            return
        structural = {k: v for k, v in self.changes.items() if k in STRUCTURAL_KEYS}
        if (structural or not self.resume_with_changes) and own_run and self.is_main:
            self.restore_hydra_files(record)
        where = "this run directory" if own_run else f"resume_from={checkpoint_dir}"
        if structural:
            raise ConfigError(
                f"cannot resume {checkpoint_dir}: {describe(structural)} (the checkpoint's trained weights have "
                f"the other shape); resume with its values, or give this run another hydra.run.dir"
            )
        if not self.resume_with_changes:
            raise ConfigError(
                f"the config differs from the one that trained {where} ({describe(self.changes)}): rerun with "
                "the same settings, or add resume_with_changes=true to continue with the new ones (recorded in "
                f"{HISTORY_FILE}), or give this run another hydra.run.dir"
            )
        log.warning("resuming with a changed config (resume_with_changes=true): %s", describe(self.changes, limit=50))

    def restore_hydra_files(self, record: dict) -> None:
        """Put back the ``.hydra`` files of the start that trained the checkpoint (Hydra overwrote them)."""
        for name, text in (record.get("hydra_files") or {}).items():
            if name in HYDRA_FILES:
                path = os.path.join(self.run_dir, HYDRA_DIR, name)
                with open(path + ".tmp", "w") as handle:
                    handle.write(text)
                os.replace(path + ".tmp", path)

    # -- the history ------------------------------------------------------------------------------
    def append_history(self, epoch: int) -> None:
        """One line for this start of training: the epoch it starts at, its overrides, its changes."""
        overrides = None
        text = self.hydra_files.get("overrides.yaml")
        if text is not None:
            import yaml

            overrides = yaml.safe_load(text)
        line = {
            "epoch": epoch,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "overrides": overrides,
            "resumed_from": self.source,
            "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()},
        }
        with open(os.path.join(self.run_dir, HISTORY_FILE), "a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
