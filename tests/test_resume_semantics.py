"""Resuming never silently changes a run; a checkpoint's loop state is checked before it is trusted.

- a rerun with a changed config is refused in one line naming the keys (and ``.hydra/`` is put
  back), unless ``resume_with_changes=true``, which records each change and its epoch;
- keys that shape the trained weights (``use_lora``, ``lora_rank``, the pipeline) cannot change, and
  a checkpoint of an older version (no config record) says which of them differs;
- ``resume_from`` a finished run trains nothing: refused, naming ``num_epochs``;
- an invalid ``ddpo_state.json`` (types, ranges, name, metrics.jsonl) or per-prompt statistics fall
  back to the previous checkpoint with a warning; an unreadable RNG file is a warning naming it.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest

from ddpo.errors import ConfigError, DDPOError
from tests.conftest import TINY, read_metrics, run_cli, run_in_process

CHECKPOINTS = "checkpoints"


def checkpoint(run_dir: Path, epochs: int) -> Path:
    return run_dir / CHECKPOINTS / f"checkpoint_{epochs:05d}"


def last_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run made as a user makes it (train.py, so .hydra/ is written)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(run_dir, TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


@pytest.mark.parametrize("change", ["train.learning_rate=0.5", "model.seed=7"])
def test_a_rerun_with_a_changed_config_is_refused_naming_the_key(copy, change):
    before = files(copy)
    result = run_cli(copy, [*TINY, change])
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("error: the config differs") and change.split("=")[0] in line, line
    assert "resume_with_changes=true" in line, line
    after = files(copy)
    assert after == before, "the refused rerun changed the run directory (.hydra/ included)"


def test_resume_with_changes_continues_and_records_each_change(copy):
    result = run_cli(copy, [*TINY, "num_epochs=3", "train.learning_rate=1e-4", "resume_with_changes=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(copy)] == [0, 1, 2]
    history = [json.loads(line) for line in (copy / "config_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 2]
    change = {"from": 3e-4, "to": 1e-4}  # the optimizer node reads train.learning_rate: both are recorded
    assert history[1]["changes"] == {"train.learning_rate": change, "optimizer.lr": change}
    assert "train.learning_rate=1e-4" in history[1]["overrides"]
    record = json.loads((checkpoint(copy, 3) / "run_config.json").read_text())
    assert record["config"]["train"]["learning_rate"] == 1e-4
    assert "learning_rate: 0.0001" in (copy / ".hydra" / "config.yaml").read_text()
    # the run is now the changed one: rerunning it as changed is no change, the original settings are
    again = run_cli(copy, [*TINY, "num_epochs=3", "train.learning_rate=1e-4"])
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr, again.stderr[-2000:]
    back = run_cli(copy, [*TINY, "num_epochs=3"])
    assert back.returncode == 1 and "train.learning_rate" in last_line(back)
    # the model card says which epochs trained with which learning rate
    from tests.test_export import export

    export.main([str(copy), "--out", str(copy.parent / "export"), "--no-sample"])
    card = (copy.parent / "export" / "README.md").read_text()
    assert "| `train.learning_rate` | 0.0001 |" in card
    assert "| 2 | `train.learning_rate` | 0.0003 | 0.0001 |" in card


def test_operational_keys_may_change_without_asking(copy):
    result = run_cli(copy, [*TINY, "num_epochs=3", "save_freq=5", "checkpoints_total_limit=4", "preemption_grace_s=9"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(copy)] == [0, 1, 2]


@pytest.mark.parametrize("change, key", [("lora_rank=8", "lora_rank"), ("use_lora=false", "use_lora")])
def test_the_weights_shape_cannot_change_even_when_asked(copy, change, key):
    with pytest.raises(ConfigError, match=f"cannot resume .*{key}") as error:
        run_in_process(copy, [*TINY, "num_epochs=3", change, "resume_with_changes=true"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "change, words",
    [("lora_rank=8", "rank 4 but this run has lora_rank=8"), ("use_lora=false", "this run has use_lora=false")],
)
def test_an_old_checkpoint_without_a_config_record_names_the_differing_key(copy, change, words):
    for record in copy.glob(f"{CHECKPOINTS}/*/run_config.json"):
        record.unlink()  # as written by an older version
    with pytest.raises(ConfigError, match=words) as error:
        run_in_process(copy, [*TINY, "num_epochs=3", change])
    assert "\n" not in str(error.value) and "size mismatch" not in str(error.value)


def test_resume_from_a_finished_run_is_refused_naming_num_epochs(finished, tmp_path):
    result = run_cli(tmp_path / "new", [*TINY, f"resume_from={finished}"])
    assert result.returncode == 1
    line = last_line(result)
    assert "has already trained 2 epoch(s)" in line and "num_epochs above 2" in line, line
    assert not (tmp_path / "new" / "metrics.jsonl").exists()
    more = run_cli(tmp_path / "more", [*TINY, f"resume_from={finished}", "num_epochs=3"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "more")] == [2]


def test_resume_from_with_a_changed_config_is_refused(finished, tmp_path):
    result = run_cli(tmp_path / "new", [*TINY, f"resume_from={finished}", "num_epochs=3", "sample.eta=0.5"])
    assert result.returncode == 1 and "sample.eta" in last_line(result)


STATE_DAMAGE = {
    "negative epochs": lambda s: s | {"epochs_completed": -5},
    "huge epochs": lambda s: s | {"epochs_completed": 10**9},
    "epochs as text": lambda s: s | {"epochs_completed": "2"},
    "epochs as bool": lambda s: s | {"epochs_completed": True},
    "fewer steps than epochs": lambda s: s | {"global_step": 1},
    "steps contradict metrics.jsonl": lambda s: s | {"global_step": 99},
    "not an object": lambda s: [s],
    "algorithm not an object": lambda s: s | {"algorithm": 3},
    "statistics not numbers": lambda s: s | {"algorithm": {"stat_tracker": {"buffers": {"a cat": ["x"]}}}},
    "statistics missing buffers": lambda s: s | {"algorithm": {"stat_tracker": {"buffer": {}}}},
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE), ids=list(STATE_DAMAGE))
def test_an_invalid_loop_state_falls_back_to_the_previous_checkpoint(copy, damage, caplog):
    path = checkpoint(copy, 2) / "ddpo_state.json"
    path.write_text(json.dumps(STATE_DAMAGE[damage](json.loads(path.read_text()))))
    with caplog.at_level(logging.WARNING):
        run_in_process(copy, TINY)
    assert str(checkpoint(copy, 2)) in caplog.text, caplog.text[-2000:]
    records = read_metrics(copy)
    assert [r["epoch"] for r in records] == [0, 1]  # epoch 1 redone from checkpoint_00001, nothing negative
    assert records[1]["global_step"] == 4


def test_the_only_checkpoint_invalid_is_one_line(copy):
    shutil.rmtree(checkpoint(copy, 1))
    path = checkpoint(copy, 2) / "ddpo_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"epochs_completed": -5}))
    with pytest.raises(DDPOError, match="epochs_completed must be a whole number >= 1") as error:
        run_in_process(copy, TINY)
    assert "none was deleted" in str(error.value)


def test_a_tampered_rng_file_is_a_warning_naming_it(copy, caplog):
    rng = checkpoint(copy, 2) / "random_states_0.pkl"
    rng.write_bytes(b"not a pickle at all")
    with caplog.at_level(logging.WARNING):
        run_in_process(copy, [*TINY, "num_epochs=3"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(rng) in w and "could not be loaded" in w for w in warnings), warnings
    assert [r["epoch"] for r in read_metrics(copy)] == [0, 1, 2]
