"""Full fine-tuning sharded with FSDP2 (ddpo/sharding.py, accelerate_configs/fsdp.yaml).

accelerate 1.15 enables FSDP only on GPU-like devices (on CPUs an FSDP config trains as plain data
parallel, which ``train.py`` refuses in one line). torch's FSDP2 runs on CPU tensors over gloo, so the
2-process runs here start ``tests/fixtures/fsdp_on_cpu.py``, which makes accelerate take its FSDP path
on CPU processes; everything else is the shipped config and the real loop. With 2 or more GPUs,
``pytest tests/test_fsdp.py -k gpus`` (scripts/check_fsdp.sh) runs the same comparison through accelerate unchanged (NCCL).

A sharded run must train what one process trains with the same global batch (as the data-parallel
runs of tests/test_multiprocess.py do: same samples, the gradient averaged over processes, AdamW on
each shard), and write checkpoints and ``final/`` that diffusers loads.
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_cli
from tests.scale_out import epochs, free_port, subprocess_env
from tests.test_multiprocess import (
    ALGORITHMS,
    COMMON,
    ENV,
    ONE_PROCESS,
    ONE_PROCESS_ONLY,
    PER_PROCESS_OF_TWO,
    distance,
    unet_weights,
)

CONFIG = ROOT / "accelerate_configs" / "fsdp.yaml"
TIMEOUT = 600
NFT = ["algorithm=nft", "algorithm.group_size=4", "train.ema_decay=0.9"]  # an old policy, the reference, an EMA
GPUS = torch.cuda.device_count()


def launch_fsdp(run_dir, overrides, on_gpus: bool = False):
    """2 processes under accelerate's FSDP2 with the shipped config: on CPUs through the fixture that
    lets accelerate take its FSDP path there, on GPUs as a user launches it."""
    script = ROOT / ("train.py" if on_gpus else "tests/fixtures/fsdp_on_cpu.py")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    env = subprocess_env(**ENV) if on_gpus else subprocess_env(ACCELERATE_USE_CPU="true", **ENV)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def report(result) -> str:
    """A failed launch: the processes' one-line errors and tracebacks, then the launcher's tail."""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:") or "Error" in line or "File " in line]
    return "\n".join([*errors[-40:], "---", result.stderr[-3000:]])


def one_process(run_dir, overrides):
    result = run_cli(run_dir, overrides, env=ENV, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def initial_weights():
    from ddpo.models import tiny_model

    return {k: v.detach().float().clone() for k, v in tiny_model().unet.state_dict().items()}


def assert_sharded_run_matches(sharded_dir, one_dir, initial, stats=()):
    log = (sharded_dir / "train.log").read_text()
    assert "world size 2;" in log, log[-3000:]
    assert epochs(sharded_dir) == epochs(one_dir)
    for checkpoint in sorted((sharded_dir / "checkpoints").iterdir()):
        # accelerate's sharded save_state (what a resume reads) and the gathered diffusers export beside it
        assert (checkpoint / "pytorch_model_fsdp_0").is_dir(), "the model was not saved by FSDP"
        assert (checkpoint / "optimizer_0").is_dir(), "the optimizer was not saved by FSDP"
        assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for two, one in zip(read_metrics(sharded_dir), read_metrics(one_dir)):
        assert two["num_samples"] == one["num_samples"]
        assert two["reward_mean"] == pytest.approx(one["reward_mean"], rel=1e-4, abs=1e-5)
        for key in stats:  # the algorithm's own numbers: what the old policy and the reference give
            assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-9), (key, two["epoch"])
    one_weights, sharded_weights = unet_weights(one_dir), unet_weights(sharded_dir)
    update = distance(one_weights, initial)
    assert update > 0
    assert distance(sharded_weights, one_weights) < 1e-2 * update


def assert_loads_in_diffusers(run_dir, weights):
    import json

    from diffusers import UNet2DConditionModel

    folder = run_dir / "final" / "unet"
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    loaded = UNet2DConditionModel.from_pretrained(folder)
    state = loaded.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


# -- what is refused, in one line ------------------------------------------------------------------
def test_an_fsdp_config_on_cpus_is_refused_in_one_line(tmp_path, monkeypatch):
    """accelerate runs an FSDP config on CPUs as plain data parallel: the run says so instead of
    training unsharded."""
    from ddpo.errors import ConfigError
    from tests.conftest import run_in_process

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="accelerate was launched with an FSDP config but runs") as error:
        run_in_process(tmp_path, [*COMMON, "num_epochs=1"])
    assert "\n" not in str(error.value)


def fsdp_accelerator(**extra):
    return SimpleNamespace(distributed_type="FSDP", is_fsdp2=True, device=torch.device("cuda"), **extra)


@pytest.mark.parametrize(
    "run, algorithm, accelerator, match",
    [
        (dict(use_lora=True), {}, fsdp_accelerator(), "FSDP shards full fine-tuning"),
        (dict(use_lora=False), {}, SimpleNamespace(**{**vars(fsdp_accelerator()), "is_fsdp2": False}), "fsdp_version"),
        (dict(use_lora=False), dict(truncation=(1, None)), fsdp_accelerator(), "algorithm.truncation"),
        (dict(use_lora=False), dict(base_decay=0.1), fsdp_accelerator(), "algorithm.base_decay"),
    ],
)
def test_what_fsdp_cannot_run_is_refused_in_one_line(run, algorithm, accelerator, match):
    from ddpo.errors import ConfigError
    from ddpo.sharding import check_sharding

    with pytest.raises(ConfigError, match=match) as error:
        check_sharding(accelerator, SimpleNamespace(**run), SimpleNamespace(**algorithm))
    assert "\n" not in str(error.value)


def test_uneven_evaluation_under_fsdp_is_refused():
    from ddpo.errors import ConfigError
    from ddpo.sharding import check_sharded_evaluation

    accelerator = fsdp_accelerator(num_processes=2)
    check_sharded_evaluation(accelerator, SimpleNamespace(prompts=["a", "b"]))
    with pytest.raises(ConfigError, match="split evenly over the 2 processes"):
        check_sharded_evaluation(accelerator, SimpleNamespace(prompts=["a", "b", "c"]))


def test_unsharded_runs_are_untouched():
    from ddpo.sharding import check_sharding, full_weights

    accelerator = SimpleNamespace(distributed_type="MULTI_CPU", is_main_process=False)
    check_sharding(accelerator, SimpleNamespace(use_lora=True), SimpleNamespace(truncation=(1, None)))
    pipeline = SimpleNamespace(full_weights=None)
    with full_weights(accelerator, pipeline) as writes:
        assert writes is False and pipeline.full_weights is None


# -- 2 sharded processes train what one process trains ---------------------------------------------
@pytest.fixture(scope="module")
def one_process_ddpo(tmp_path_factory):
    return one_process(tmp_path_factory.mktemp("one") / "run", ONE_PROCESS)


@pytest.fixture(scope="module")
def sharded_ddpo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    result = launch_fsdp(run_dir, PER_PROCESS_OF_TWO)
    assert result.returncode == 0, report(result)
    return run_dir


def test_fsdp_on_two_processes_matches_one_process_and_exports_for_diffusers(
    sharded_ddpo, one_process_ddpo, initial_weights
):
    assert_sharded_run_matches(sharded_ddpo, one_process_ddpo, initial_weights)
    assert_loads_in_diffusers(sharded_ddpo, unet_weights(sharded_ddpo))
    assert "trained weights:" in (sharded_ddpo / "train.log").read_text()


@pytest.mark.slow
def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path, sharded_ddpo):
    """Stopped after epoch 1 and resumed, a sharded run trains the weights of the uninterrupted one."""
    run_dir = tmp_path / "run"
    first = launch_fsdp(run_dir, [*PER_PROCESS_OF_TWO, "num_epochs=1"])
    assert first.returncode == 0, report(first)
    second = launch_fsdp(run_dir, PER_PROCESS_OF_TWO)
    assert second.returncode == 0, report(second)
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert epochs(run_dir) == epochs(sharded_ddpo) == [0, 1]
    resumed, straight = unet_weights(run_dir), unet_weights(sharded_ddpo)
    assert distance(resumed, straight) <= 1e-6 * max(distance(straight, {k: 0 * v for k, v in straight.items()}), 1)


@pytest.mark.slow
def test_fsdp_shards_the_old_policy_reference_and_ema(tmp_path, initial_weights):
    """NFT keeps an old policy and the reference, and the run an EMA (final/ holds it): sharded, they
    are made of the shards (and the reference sharded like the module), and the run is one process's."""
    one = one_process(tmp_path / "one", [*ONE_PROCESS, *NFT])
    sharded = tmp_path / "fsdp"
    result = launch_fsdp(sharded, [*PER_PROCESS_OF_TWO, *NFT])
    assert result.returncode == 0, report(result)
    # the old policy's distance is 0 until it first moves (epoch 0), and the reference's KL is 0 before training
    assert read_metrics(sharded)[-1]["old_distance"] > 0 and read_metrics(sharded)[-1]["kl_ref"] > 0
    assert_sharded_run_matches(sharded, one, initial_weights, stats=("old_distance", "kl_ref", "x0_error"))
    from safetensors.torch import load_file

    checkpoint = sorted((sharded / "checkpoints").iterdir())[-1]
    for name in ("old_policy.safetensors", "ema.safetensors"):  # gathered whole, by the parameters' names
        saved = load_file(str(checkpoint / name))
        assert saved.keys() == load_file(str(sorted((one / "checkpoints").iterdir())[-1] / name)).keys()


@pytest.mark.slow
def test_fsdp_reward_gradient_matches_one_process(tmp_path, initial_weights):
    """DRaFT differentiates the chain's tail (checkpointed: the backward pass reruns the sharded calls);
    FSDP averages its gradients over the processes, and the loop must not average them again."""
    one = one_process(tmp_path / "one", [*ONE_PROCESS, *ALGORITHMS["draft"], *ONE_PROCESS_ONLY["draft"]])
    sharded = tmp_path / "fsdp"
    result = launch_fsdp(sharded, [*PER_PROCESS_OF_TWO, *ALGORITHMS["draft"]])
    assert result.returncode == 0, report(result)
    assert_sharded_run_matches(sharded, one, initial_weights, stats=("grad_norm",))


@pytest.mark.skipif(GPUS < 2, reason="FSDP over NCCL needs 2 or more GPUs (one process per GPU)")
def test_fsdp_on_two_gpus_matches_one_process(tmp_path, initial_weights):
    exact = ["allow_tf32=false"]  # TF32 matmuls would round differently in the two runs
    one = one_process(tmp_path / "one", [*ONE_PROCESS, *exact])
    sharded = tmp_path / "fsdp"
    result = launch_fsdp(sharded, [*PER_PROCESS_OF_TWO, *exact], on_gpus=True)
    assert result.returncode == 0, report(result)
    assert_sharded_run_matches(sharded, one, initial_weights)
    assert_loads_in_diffusers(sharded, unet_weights(sharded))
