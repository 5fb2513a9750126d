"""Bad inputs end in one line: prompt files that are not files, damaged run records, numbers out of
range, and the overrides Hydra itself cannot compose.

Nothing here may hang on the old behaviour either: whatever could block on a FIFO runs with a deadline,
after which the test opens the FIFO's other end itself (so the blocked call returns) and fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import typing

import pytest

from ddpo.config import RunConfig, plan_batches, run_config
from ddpo.errors import ConfigError, DDPOError
from tests.conftest import ROOT, TINY, compose

DEADLINE_S = 30  # for a call that must not wait on a FIFO (it returns at once when it does not)


def call_without_blocking(fn, fifo):
    """``fn()``'s result or exception; a call still blocked on ``fifo`` after the deadline fails the test."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        # O_RDWR opens a FIFO without waiting and serves as both ends: the blocked open returns, then EOF
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        thread.join(DEADLINE_S)
        pytest.fail(f"blocked on the FIFO {fifo} for {DEADLINE_S} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- item 5: prompt files and word lists --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_prompt_path_that_is_not_a_regular_file_is_refused_in_one_line(kind, tmp_path):
    from ddpo.prompts import FilePrompts

    path = {"fifo": tmp_path / "prompts.fifo", "directory": tmp_path, "device": "/dev/null"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ConfigError) as info:
        call_without_blocking(lambda: FilePrompts(path), path)
    message = str(info.value)
    words = {"fifo": "a named pipe (FIFO)", "directory": "a directory", "device": "a device"}[kind]
    assert f"{path} is {words}, not a regular file" in message and "prompt.path" in message, message
    assert "\n" not in message


def test_a_prompt_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    import ddpo.prompts

    monkeypatch.setattr(ddpo.prompts, "MAX_PROMPT_FILE_BYTES", 1000)
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n" * 200)  # 1200 bytes
    with pytest.raises(ConfigError, match=r"prompts\.txt is larger than the 1000 bytes read of a prompt file"):
        ddpo.prompts.FilePrompts(path)
    path.write_text("a cat\n" * 100)  # 600 bytes: read as before
    assert ddpo.prompts.FilePrompts(path).prompts == ["a cat"] * 100
    # word lists (here one given by absolute path) are read through the same bound
    path.write_text("cat\n" * 300)
    with pytest.raises(ConfigError, match=r"word list .* is larger than the 1000 bytes"):
        ddpo.prompts.load_asset_lines(str(path))


def test_prompt_files_keep_their_newline_handling_and_messages(tmp_path):
    from ddpo.prompts import FilePrompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\r\na dog\rthe sun\n\n")  # CRLF and old-Mac line ends, as text-mode open read them
    assert FilePrompts(path).prompts == ["a cat", "a dog", "the sun"]
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"prompts\.txt: not UTF-8 text .*\(prompt\.path\)"):
        FilePrompts(path)
    with pytest.raises(ConfigError, match=r"prompt file not found: .*missing\.txt \(prompt\.path\)"):
        FilePrompts(tmp_path / "missing.txt")


def test_a_fifo_as_prompt_path_ends_the_run_in_one_line(tmp_path):
    """The whole path (train.py, the run lock held): one line, and no wait for a writer that never comes."""
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "prompt=from_file",
        f"prompt.path={fifo}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: prompt file {fifo} is a named pipe (FIFO), not a regular file (prompt.path)", last


# -- item 10: metrics.jsonl and eval.jsonl ------------------------------------------------------------
BAD_LINES = {  # line number -> (line, why it is dropped)
    2: (b"[1, 2]", "it is an array, not a JSON object"),
    3: (b'{"reward_mean": 1.0}', 'it has no "epoch"'),
    4: (b'{"epoch": "3"}', 'its "epoch" is "3", not an integer >= 0'),
    5: (b'{"epoch": -1}', 'its "epoch" is -1, not'),
    6: (b'{"epoch": true}', 'its "epoch" is true, not'),
    7: (b'{"epoch": 1.5}', 'its "epoch" is 1.5, not'),
    8: (b'{"epoch": 4, "rew', "it is not JSON"),  # torn, but not the last line
    9: (b"3", "it is 3, not a JSON object"),
    10: (b"null", "it is null, not a JSON object"),
    11: (b'"epoch"', "it is a string, not a JSON object"),
    12: (b'{"epoch": 6, "x": "\xff"}', "it is not JSON"),  # not UTF-8
}


@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.jsonl"])
def test_lines_that_are_not_epoch_records_are_dropped_with_a_warning(name, tmp_path, caplog):
    from ddpo.logging import MetricsFile

    lines = [b'{"epoch": 0, "reward_mean": 1.0}', *(line for line, _ in BAD_LINES.values()), b"", b'{"epoch": 5}']
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    metrics = MetricsFile(str(tmp_path), name)
    with caplog.at_level(logging.WARNING, logger="ddpo.logging"):
        assert metrics.read() == [{"epoch": 0, "reward_mean": 1.0}, {"epoch": 5}]
    for number, (_, why) in BAD_LINES.items():
        assert f"{path} line {number}: dropped, {why}" in caplog.text, (number, caplog.text)
    assert "dropped its last line" not in caplog.text  # only a damaged last line is taken for a torn write
    metrics.keep_epochs_before(1)  # a resume rewrites the file: what it keeps are records
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 0, "reward_mean": 1.0}]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_metrics_path_that_cannot_be_a_file_is_one_line(kind, tmp_path):
    from ddpo.logging import MetricsFile

    path = tmp_path / "metrics.jsonl"
    if kind == "directory":
        os.mkdir(path)
    else:
        os.mkfifo(path)
    metrics = MetricsFile(str(tmp_path))
    words = {"directory": "a directory", "fifo": "a named pipe (FIFO)"}[kind]
    for call in (metrics.read, lambda: metrics.keep_epochs_before(0), lambda: metrics.append({"epoch": 0})):
        with pytest.raises(DDPOError) as info:
            call_without_blocking(call, path)
        assert str(info.value).startswith(f"{path} is {words}, not a file"), str(info.value)
        assert "\n" not in str(info.value)


# -- item 11: numbers out of range ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.adam_beta1=1.5", r"train\.adam_beta1 must be in \[0, 1\) \(got 1\.5\)"),
        ("train.adam_beta1=-0.1", r"train\.adam_beta1 must be in \[0, 1\) \(got -0\.1\)"),
        ("train.adam_beta2=1.0", r"train\.adam_beta2 must be in \[0, 1\) \(got 1\.0\)"),
        ("train.adam_epsilon=-1", r"train\.adam_epsilon must be > 0 \(got -1\.0\)"),
        ("train.adam_epsilon=0", r"train\.adam_epsilon must be > 0 \(got 0\.0\)"),
        ("train.adam_weight_decay=-5", r"train\.adam_weight_decay must be >= 0 \(got -5\.0\)"),
        ("sample.eta=-1", r"sample\.eta must be >= 0 \(got -1\.0\)"),
        ("per_prompt_stat_tracking.min_count=17", r"min_count=17 exceeds buffer_size=16"),
    ],
)
def test_numbers_out_of_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_batches(run_config(compose([override])))


def test_every_numeric_key_of_the_schema_has_a_range():
    from ddpo.config import NUMBER_RULES

    def numeric_keys(node, prefix=""):
        hints = typing.get_type_hints(node)
        for f in dataclasses.fields(node):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                yield from numeric_keys(kind, f"{prefix}{f.name}.")
            elif {int, float} & {kind, *typing.get_args(kind)}:
                yield f"{prefix}{f.name}"

    assert sorted(rule.key for rule in NUMBER_RULES) == sorted(numeric_keys(RunConfig))


def test_values_no_run_uses_are_warned_about_once(caplog):
    run = run_config(compose(["lora_rank=100000", "sample.eta=1e9", "train.learning_rate=2"]))
    with caplog.at_level(logging.WARNING, logger="ddpo.config"):
        for world_size in (1, 1, 2):  # build plans a run up to three times
            plan_batches(run, world_size)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    for key, usual in [("lora_rank=100000", "in [1, 256]"), ("sample.eta=1000000000.0", "in [0, 1]")]:
        assert any(w.startswith(f"{key} is unusual (runs use values {usual}") for w in warnings), warnings
    assert any(w.startswith("train.learning_rate=2.0 is unusual (runs use values in [0, 0.1]") for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpo.config"):
        plan_batches(run_config(compose([])))  # the defaults: nothing to say
    assert not caplog.records


def test_an_optimizer_setting_out_of_range_ends_the_run_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "train.adam_beta1=1.5", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.adam_beta1 must be in [0, 1) (got 1.5)"), last


# -- item 13: what Hydra cannot compose -----------------------------------------------------------------
DDPO_TRAIN = "import sys; from ddpo.cli import train; sys.argv[0] = 'ddpo-train'; train()"  # the console script
COMPOSITION = {
    "wrong_type": (["num_epochs=abc"], "error: num_epochs must be an integer (got 'abc')"),
    "wrong_type_in_a_group": (["sample.num_steps=1.5"], "error: sample.num_steps must be an integer (got 1.5)"),
    "unknown_option": (["reward=nosuch"], "error: could not find 'reward/nosuch' (options of reward: aesthetic, "),
    "malformed_override": (["num_epochs=="], "error: cannot parse the override 'num_epochs==' (extraneous input '=')"),
    "unknown_key": (["foo=1"], "error: unknown config key 'foo' (check its spelling; a new key is added with +foo=1"),
    "null_group": (["model=null"], "error: Config group override must be a string or a list. Got NoneType"),
    "group_as_value": (["sample=3"], "error: sample is a group of keys (num_steps, eta, "),
    "help_with_unknown_option": (["reward=nosuch", "--help"], "error: could not find 'reward/nosuch'"),
    "misspelt_option_of_a_long_group": (
        ["experiment=tiny_compresibility"],
        "error: could not find 'experiment/tiny_compresibility' (did you mean tiny_compressibility",
    ),
}


def test_a_long_group_names_close_matches_instead_of_every_option():
    from ddpo.hydra_callbacks import OPTIONS_LISTED, _options_hint

    many = [f"preset_number_{i:02d}" for i in range(40)]
    hint = _options_hint("experiment", "preset_numbr_07", many)
    assert hint.startswith("did you mean preset_number_07") and "40 options" in hint and "--help" in hint
    assert len(hint) < OPTIONS_LISTED
    few = ["aesthetic", "pickscore"]
    assert _options_hint("reward", "aestetic", few) == "did you mean aesthetic? options of reward: aesthetic, pickscore"
    assert _options_hint("reward", "zzz", few) == "options of reward: aesthetic, pickscore"


def run_app(args, tmp_path, env=None, console_script=False):
    program = ["-c", DDPO_TRAIN] if console_script else [str(ROOT / "train.py")]
    cmd = [sys.executable, *program, f"hydra.run.dir={tmp_path / 'run'}", *args]
    full_env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(COMPOSITION))
def test_an_override_hydra_cannot_compose_is_one_line(case, tmp_path):
    args, start = COMPOSITION[case]
    result = run_app(args, tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run directory


def test_the_console_script_reports_composition_errors_alike(tmp_path):
    result = run_app(["foo=1"], tmp_path, console_script=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: unknown config key 'foo' (check its spelling; a new key is added with +foo=1; "
        "ddpo-train --cfg job lists every key)"
    )


def test_hydra_full_error_still_gives_the_full_trace(tmp_path):
    result = run_app(["num_epochs=abc"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "Error merging override num_epochs=abc" in result.stderr


# -- values the schema cannot type: deleted, unresolvable, or too big to allocate ------------------------
@pytest.mark.parametrize(
    "override, start",
    [
        ("~seed", "error: seed is mandatory and has no value (set seed=...)"),
        ("num_epochs=${nosuch}", "error: num_epochs: cannot resolve its interpolation"),
        ("model.resolution=100000", "error: model.resolution must be in (0, 4096] pixels (got 100000)"),
        ("model.resolution=abc", "error: model.resolution must be an integer"),
    ],
)
def test_values_that_cannot_be_used_end_the_run_in_one_line(override, start, tmp_path):
    result = run_app([*TINY, override], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr[-3000:]
