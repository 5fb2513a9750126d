"""Bad inputs stop ``python train.py`` at once with a short message that names the culprit.

Each case runs the real CLI: non-zero exit, no Python traceback, and a message short enough to read.
The CLI runs of the selected cases start together (a module fixture) and each test checks its own.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY, run_cli

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ONE_EPOCH = [*TINY, "num_epochs=1", "sample.num_batches_per_epoch=1"]
BAD_REWARD = "reward._target_=tests.fixtures.bad_rewards."
MAX_LINE = 400  # a message line a user reads whole; model errors quote the loader's reason (<= 200 chars)

# id -> (overrides, words the message must contain (case-insensitive))
CASES = {
    # unknown options and keys, wrong types: Hydra's own composition errors
    "unknown_reward": (["reward=nope"], ["reward/nope", "jpeg_compressibility"]),
    "unknown_prompt": (["prompt=nope"], ["prompt/nope", "animals"]),
    "unknown_model": (["model=nope"], ["model/nope", "tiny"]),
    "unknown_logger": (["logger=nope"], ["logger/nope", "tensorboard"]),
    "unknown_key": (["foo=1"], ["foo"]),
    "wrong_type": (["sample.batch_size=abc"], ["sample.batch_size", "abc"]),
    "wrong_enum": (["mixed_precision=fp32"], ["mixed_precision", "fp32"]),
    # values the schema accepts but a run cannot use: checked before anything heavy is loaded
    "non_dividing_train_batch": (["train.batch_size=3"], ["train.batch_size=3", "divide"]),
    "non_dividing_accumulation": (["train.gradient_accumulation_steps=3"], ["train.gradient_accumulation_steps=3"]),
    "eta_zero": (["sample.eta=0"], ["sample.eta", "> 0"]),
    "timestep_fraction_zero": (["train.timestep_fraction=0"], ["train.timestep_fraction", "(0, 1]"]),
    "timestep_fraction_above_one": (["train.timestep_fraction=1.5"], ["train.timestep_fraction", "1.5"]),
    "negative_epochs": (["num_epochs=-1"], ["num_epochs", "-1"]),
    # prompt files
    "prompt_path_not_set": (["prompt=from_file"], ["prompt.path"]),
    "prompt_file_missing": (["prompt=from_file", "prompt.path={tmp}/missing.txt"], ["prompt.path", "missing.txt"]),
    "prompt_file_empty": (["prompt=from_file", f"prompt.path={FIXTURES}/empty_prompts.txt"],
                          ["empty_prompts.txt", "no prompts"]),
    # models that cannot be loaded offline
    "model_not_cached_offline": (["model=sd15"], ["stable-diffusion-v1-5", "model=tiny", "model.path"]),
    "model_path_missing": (["model.path={tmp}/no_such_model"], ["model.path=", "no_such_model", "no such directory"]),
    # rewards that misbehave during the first epoch
    "reward_nan": ([BAD_REWARD + "NaNReward"], ["reward", "NaN"]),
    "reward_wrong_count": ([BAD_REWARD + "WrongCountReward"], ["reward", "returned 1 values for 2 images"]),
    "reward_raises": ([BAD_REWARD + "RaisingReward"], ["reward", "RuntimeError", "scorer exploded on purpose"]),
}


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """The selected cases' CLI runs, started together: most of their time is imports, which overlap."""
    module = request.module
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is module and hasattr(item, "callspec")]
    workers = max(2, min(4, os.cpu_count() or 2))  # the runs are CPU-bound (imports): about one per core
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = {}
        slow_first = sorted(dict.fromkeys(selected), key=lambda c: not c.startswith(("reward", "model", "prompt")))
        for case in slow_first:
            tmp = tmp_path_factory.mktemp(case)
            overrides = [o.replace("{tmp}", str(tmp)) for o in CASES[case][0]]
            env = {"HF_HOME": str(tmp / "empty_hf_home")}  # offline and nothing cached, on any machine
            runs[case] = (tmp, pool.submit(run_cli, tmp / "run", [*ONE_EPOCH, *overrides], env, 300))
        yield runs


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_with_a_short_message(case, cli_runs):
    _, words = CASES[case]
    tmp_path, future = cli_runs[case]
    result = future.result()
    output = result.stdout + result.stderr

    assert result.returncode != 0, f"{case}: the run did not fail\n{output[-2000:]}"
    assert "Traceback" not in output, f"{case}: a traceback reached the user\n{output[-4000:]}"
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert stderr_lines, f"{case}: nothing on stderr"
    assert len(stderr_lines) <= 25, f"{case}: {len(stderr_lines)} lines of error output\n{result.stderr}"
    too_long = [line for line in stderr_lines if len(line) > MAX_LINE]
    assert not too_long, f"{case}: message lines over {MAX_LINE} characters: {too_long}"
    missing = [w for w in words if w.lower() not in result.stderr.lower()]
    assert not missing, f"{case}: the message does not name {missing}\n{result.stderr}"

    if case.startswith(("unknown", "wrong")):
        return  # Hydra's composition errors: its message, then its HYDRA_FULL_ERROR hint
    # our own errors end with one "error: ..." line naming the culprit, and no epoch ran
    assert stderr_lines[-1].startswith("error: "), f"{case}: {stderr_lines[-1]!r}"
    # the hub's reason for an uncached model is quoted (up to 200 characters), hence MAX_LINE there
    assert len(stderr_lines[-1]) < (MAX_LINE if case == "model_not_cached_offline" else 300), stderr_lines[-1]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip(), f"{case}: an epoch was recorded"
    assert not (tmp_path / "run" / "checkpoints").exists()
