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
    "unknown_experiment": (
        ["experiment=tiny_compresibility"],
        ["experiment/tiny_compresibility", "tiny_compressibility"],
    ),
    "wrong_type": (["sample.batch_size=abc"], ["sample.batch_size", "abc"]),
    "wrong_enum": (["mixed_precision=fp32"], ["mixed_precision", "fp32"]),
    "wrong_type_in_group": (["sample.num_steps=1.5"], ["sample.num_steps", "an integer", "1.5"]),
    "wrong_override_syntax": (["num_epochs=="], ["num_epochs==", "key=value"]),
    # values the schema accepts but a run cannot use: checked before anything heavy is loaded
    "non_dividing_train_batch": (["train.batch_size=3"], ["train.batch_size=3", "divide"]),
    "non_dividing_accumulation": (["train.gradient_accumulation_steps=3"], ["train.gradient_accumulation_steps=3"]),
    "eta_zero": (["sample.eta=0"], ["sample.eta", "> 0"]),
    "guidance_below_one": (["sample.guidance_scale=0.5"], ["sample.guidance_scale", ">= 1", "0.5"]),
    "added_unknown_key": (["+no_such_key=1"], ["no_such_key"]),
    "eval_every_negative": (["eval.every=-1"], ["eval.every", ">= 0"]),
    "eval_seeds_zero": (["eval.every=1", "eval.seeds=0"], ["eval.seeds", "> 0"]),
    "shapes_reward_on_animal_prompts": (["reward=shape_alignment"], ["shape_alignment", "shapes grammar"]),
    # NaN passes every "x <= 0" check: non-finite numbers are refused by name
    "eta_nan": (["sample.eta=nan"], ["sample.eta", "finite", "nan"]),
    "guidance_nan": (["sample.guidance_scale=nan"], ["sample.guidance_scale", "finite"]),
    "adv_clip_nan": (["train.adv_clip_max=nan"], ["train.adv_clip_max", "finite"]),
    "learning_rate_inf": (["train.learning_rate=inf"], ["train.learning_rate", "finite", "inf"]),
    "launcher_without_multirun": (["launcher=slurm"], ["launcher=slurm", "-m"]),
    "timestep_fraction_zero": (["train.timestep_fraction=0"], ["train.timestep_fraction", "(0, 1]"]),
    "timestep_fraction_above_one": (["train.timestep_fraction=1.5"], ["train.timestep_fraction", "1.5"]),
    "negative_epochs": (["num_epochs=-1"], ["num_epochs", "-1"]),
    "negative_seed": (["seed=-1"], ["seed", "-1"]),
    "seed_too_large": ([f"seed={2**70}"], ["seed", str(2**70)]),
    "negative_grace": (["preemption_grace_s=-1"], ["preemption_grace_s", "-1"]),
    # optimizer settings torch.optim.AdamW would refuse in a traceback
    "adam_beta1_above_one": (["train.adam_beta1=1.5"], ["train.adam_beta1", "[0, 1)", "1.5"]),
    "adam_epsilon_negative": (["train.adam_epsilon=-1"], ["train.adam_epsilon", "> 0", "-1"]),
    "adam_weight_decay_negative": (["train.adam_weight_decay=-5"], ["train.adam_weight_decay", ">= 0", "-5"]),
    "too_many_steps": (["sample.num_steps=100000"], ["sample.num_steps=100000", "1000"]),
    "resolution_zero": (["model.resolution=0"], ["model.resolution", "0"]),
    "resolution_negative": (["model.resolution=-64"], ["model.resolution", "-64"]),
    "resolution_not_multiple": (["model.resolution=65"], ["model.resolution", "65"]),
    # prompt files
    "prompt_path_not_set": (["prompt=from_file"], ["prompt.path"]),
    "prompt_file_missing": (["prompt=from_file", "prompt.path={tmp}/missing.txt"], ["prompt.path", "missing.txt"]),
    "prompt_file_empty": (
        ["prompt=from_file", f"prompt.path={FIXTURES}/empty_prompts.txt"],
        ["empty_prompts.txt", "no prompts"],
    ),
    # models that cannot be loaded offline
    "model_not_cached_offline": (["model=sd15"], ["stable-diffusion-v1-5", "model=tiny", "model.path"]),
    "model_path_missing": (["model.path={tmp}/no_such_model"], ["model.path=", "no_such_model", "no such directory"]),
    # rewards that misbehave during the first epoch
    "reward_nan": ([BAD_REWARD + "NaNReward"], ["reward", "NaN"]),
    "reward_wrong_count": ([BAD_REWARD + "WrongCountReward"], ["reward", "returned 1 values for 2 images"]),
    "reward_strings": ([BAD_REWARD + "StringReward"], ["reward", "not numbers"]),
    "image_hook_raises": (
        ["logger.image_hook._target_=tests.fixtures.hooks.failing_hook"],
        ["tests.fixtures.hooks.failing_hook", "epoch 1", "fails on purpose", "checkpoint"],
    ),
    "reward_raises": ([BAD_REWARD + "RaisingReward"], ["reward", "RuntimeError", "scorer exploded on purpose"]),
}


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """The selected cases' CLI runs, started together: most of their time is imports, which overlap."""
    module = request.module
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is module and hasattr(item, "callspec")
    ]
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

    if case.startswith(("unknown", "wrong")):  # Hydra's composition errors, before the run directory exists
        assert len(stderr_lines) == 1 and stderr_lines[0].startswith("error: "), f"{case}: {result.stderr}"
        return
    # our own errors end with one "error: ..." line naming the culprit, and no epoch ran
    assert stderr_lines[-1].startswith("error: "), f"{case}: {stderr_lines[-1]!r}"
    # the hub's reason for an uncached model is quoted (up to 200 characters), hence MAX_LINE there
    assert len(stderr_lines[-1]) < (MAX_LINE if case == "model_not_cached_offline" else 300), stderr_lines[-1]
    # the run's log keeps the reason too (a failed run never leaves an empty train.log)
    assert stderr_lines[-1] in (tmp_path / "run" / "train.log").read_text(), f"{case}: train.log lacks the error"
    if case == "image_hook_raises":  # the hook runs after the epoch: that epoch is recorded and checkpointed
        assert (tmp_path / "run" / "checkpoints" / "checkpoint_00001").is_dir()
        return
    # a run that fails before its first epoch leaves no metrics file behind
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), f"{case}: metrics.jsonl was written"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    """No HF_HUB_OFFLINE and no network: one probe, then the local cache only (no minute of retries)."""
    from tests.scale_out import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    env = {
        "HF_HUB_OFFLINE": "",
        "HF_ENDPOINT": closed,
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    result = run_cli(tmp_path / "run", [*ONE_EPOCH, "reward=aesthetic", f"reward.head_url={closed}/head.pth"], env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Hugging Face Hub is not reachable" in output, output[-3000:]
    assert "thrown while requesting" not in output, "huggingface_hub retried the unreachable Hub"
    assert result.stderr.strip().splitlines()[-1].startswith("error: LAION aesthetic head"), result.stderr[-3000:]


def test_unreachable_names_the_host_and_passes_a_listening_one():
    import socket

    from ddpo.network import unreachable
    from tests.scale_out import free_port

    assert "127.0.0.1" in unreachable(f"http://127.0.0.1:{free_port()}/x")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None


def test_a_url_download_follows_redirects_is_verified_and_stops_at_its_size(tmp_path, monkeypatch):
    """The reward download's URL source (httpx2): GitHub's raw links redirect; a file is kept only if
    its sha256 matches, and a download longer than announced is cut off."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # URL sources are skipped offline
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ddpo.errors import ConfigError
    from rewards.download import UrlSource, fetch_url, fetch_verified

    content = bytes(range(256)) * 40

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/raw/head.pth":
                self.send_response(302)
                self.send_header("Location", "/files/head.pth")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200 if self.path == "/files/head.pth" else 404)
                body = content if self.path == "/files/head.pth" else b"no"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        sha256 = hashlib.sha256(content).hexdigest()
        kept = fetch_verified(
            "head.pth",
            tmp_path / "cache",
            [UrlSource(f"{url}/raw/head.pth", 10)],
            sha256=sha256,
            size=len(content),
            what="head",
            fix="set head_path",
        )
        assert kept.read_bytes() == content and [p.name for p in kept.parent.iterdir()] == ["head.pth"]
        with pytest.raises(ConfigError, match="could not be downloaded") as caught:  # not the pinned file: refused
            fetch_verified(
                "other.pth",
                tmp_path / "cache",
                [UrlSource(f"{url}/raw/head.pth", 10)],
                sha256="0" * 64,
                size=None,
                what="head",
                fix="set head_path",
            )
        assert "\n" not in str(caught.value) and not (tmp_path / "cache" / "other.pth").exists()
        with pytest.raises(OSError, match="exceeds the expected 1000 bytes"):
            fetch_url(f"{url}/files/head.pth", tmp_path / "part", 10, max_bytes=1000)
        with pytest.raises(Exception, match="404"):
            fetch_url(f"{url}/missing", tmp_path / "part", 10)
    finally:
        server.shutdown()
        server.server_close()


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            *(["-m"] if key == "hydra.sweep.dir" else []),
            *ONE_EPOCH,
            f"{key}={blocker}/run",
        ]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines == [f"error: {key}={blocker}/run cannot be used as the output directory (Not a directory)"]
