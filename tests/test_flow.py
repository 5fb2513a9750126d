"""The flow-matching family (pipeline=flow_sde; model=tiny_flow, sd3_arch, sd35_medium): Flow-GRPO in this repo.

The tiny SD3 model runs every code path on the CPU in seconds: its conditioning is diffusers' own,
its evaluation sampler is diffusers' StableDiffusion3Pipeline, the first PPO step has ratio 1 (with
and without guidance, with an SDE window), its LoRA loads with ``load_lora_weights``, runs resume
exactly. The slow tests check that the quick-start preset learns JPEG compressibility.

    pytest tests/test_flow.py                # fast tests
    pytest -m slow tests/test_flow.py        # the learning checks (a few CPU minutes each)
"""

import json
import time
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from ddpo.models.tiny_flow import build_tiny_flow_pipeline
from tests.conftest import TINY, compose, read_metrics, run_cli, run_in_process
from tests.test_first_step_ratio import first_step_losses
from tests.test_lora_export import lora_params
from tests.test_quickstart import trend_in_standard_errors
from tests.test_resume import assert_same_epochs
from tests.test_sdxl import assert_ratio_one

BASE = [o for o in TINY if not o.startswith("model=")]
FLOW = [*BASE, "model=tiny_flow", "pipeline=flow_sde", "pipeline.max_sequence_length=8"]
FAST = ["num_epochs=1", "train.learning_rate=1e-2"]  # one epoch visibly moves the weights


def flow_pipeline(components=None, **kwargs):
    from ddpo.pipelines import FlowMatchingDDPOPipeline

    settings = {"num_steps": 3, "guidance_scale": 4.5, "max_sequence_length": 8, **kwargs}
    return FlowMatchingDDPOPipeline(components or build_tiny_flow_pipeline(), **settings)


def transformer_output(transformer, seed=0):
    """The transformer's prediction on a fixed input (no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    config = transformer.config
    size = config.sample_size
    latents = torch.randn(2, config.in_channels, size, size, generator=gen)
    embeds = torch.randn(2, 20, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=gen)
    with torch.no_grad():
        return transformer(latents, embeds, pooled, torch.tensor([900.0, 100.0])).sample


# -- conditioning and sampling ------------------------------------------------------------------------
@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
def test_conditioning_is_diffusers_sd3_conditioning(with_t5):
    pipe = build_tiny_flow_pipeline(with_t5=with_t5)
    ours = flow_pipeline(pipe)
    prompts = ["a cat", "a dog riding a bike"]
    cond = ours.encode_prompts(prompts)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8
    )
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert embeds.shape[1] == 77 + 8  # CLIP tokens, then T5's (zeros without T5)
    assert bool((embeds[:, 77:] == 0).all()) != with_t5
    ours_negative, ours_negative_pooled = ours.negative_conditioning(len(prompts))
    torch.testing.assert_close(ours_negative, negative, rtol=0, atol=1e-6)  # the empty prompt, encoded
    torch.testing.assert_close(ours_negative_pooled, negative_pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_evaluation_sampler_is_diffusers_sd3_pipeline(guidance):
    """In evaluation mode the pipeline samples the ODE with eval_num_steps: what StableDiffusion3Pipeline draws."""
    pipe = build_tiny_flow_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ours = flow_pipeline(pipe, num_steps=2, eval_num_steps=5, guidance_scale=guidance)
    assert ours.sample_cfg == (guidance > 1)
    prompts = ["a cat", "a horse"]
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    with ours.evaluation():
        rollout = ours.sample(ours.encode_prompts(prompts), generators)
    assert rollout.log_probs.shape == (2, 0)  # the ODE stores no transitions
    noise = torch.stack([torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    expected = pipe(
        prompts,
        num_inference_steps=5,
        guidance_scale=guidance,
        height=64,
        width=64,
        latents=noise,
        max_sequence_length=8,
        output_type="pt",
    ).images
    torch.testing.assert_close(rollout.images, expected, rtol=0, atol=1e-4)
    # outside evaluation: the SDE with num_steps steps, every one stored
    rollout = ours.sample(ours.encode_prompts(prompts), [torch.Generator().manual_seed(s) for s in (3, 4)])
    assert rollout.log_probs.shape == (2, 2)
    assert rollout.steps["step_index"].tolist() == [[0, 1], [0, 1]]


def test_sde_window_stores_only_its_steps():
    """Steps outside [start, end) are Euler ODE steps, and only the window's transitions are stored."""
    from ddpo.schedulers.flow_sde import flow_ode_step

    ours = flow_pipeline(num_steps=5, sde_window=[2, 4])
    assert ours.stored_steps == 2
    cond = ours.encode_prompts(["a cat", "a dog"])
    rollout = ours.sample(cond, [torch.Generator().manual_seed(s) for s in (0, 1)])
    steps = rollout.steps
    assert steps["step_index"].tolist() == [[2, 3], [2, 3]]
    assert rollout.log_probs.shape == (2, 2) and steps["latents"].shape == (2, 2, 16, 16, 16)
    torch.testing.assert_close(steps["latents"][:, 1], steps["next_latents"][:, 0], rtol=0, atol=0)
    # the first two steps are the deterministic ODE from the same initial noise
    latents = torch.stack([torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    schedule = ours._train_schedule
    with torch.no_grad():
        for i in range(2):
            velocity = ours._velocity(latents, schedule.timesteps[i].expand(2), cond, cfg=True)
            latents = flow_ode_step(velocity, latents, schedule.sigmas[i], schedule.sigmas[i + 1])
    torch.testing.assert_close(steps["latents"][:, 0], latents, rtol=0, atol=1e-5)
    # and the stored steps re-score to their sampled log probs
    batch = rollout.transitions(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0]]))
    with torch.no_grad():
        log_prob, _, std = ours.log_prob(batch)
    torch.testing.assert_close(log_prob, batch["log_probs"], rtol=0, atol=1e-5)
    assert bool((std > 0).all())


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"noise_level": 0.0}, ["noise_level", "> 0"]),
        ({"sigma_schedule": "dance"}, ["sigma_schedule", "flow_grpo"]),
        ({"sde_window": [2, 2]}, ["sde_window", "start < end"]),
        ({"sde_window": [0, 4]}, ["sde_window", "num_steps=3"]),
    ],
)
def test_bad_sampler_settings_are_one_line(kwargs, words):
    with pytest.raises(ConfigError) as raised:
        flow_pipeline(**kwargs)
    assert "\n" not in str(raised.value) and all(w in str(raised.value) for w in words), str(raised.value)


def test_bf16_casts_frozen_modules_only():
    """Frozen modules run in bf16; LoRA weights, log probabilities and their gradients stay float32."""
    ours = flow_pipeline(mixed_precision="bf16", use_lora=True)
    assert ours.vae.dtype == torch.bfloat16 and all(e.dtype == torch.bfloat16 for e in ours.text_encoders)
    trainable = ours.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in ours.transformer.parameters() if not p.requires_grad)
    rollout = ours.sample(ours.encode_prompts(["a cat"]), [torch.Generator().manual_seed(0)])
    assert rollout.log_probs.dtype == torch.float32 and bool(torch.isfinite(rollout.log_probs).all())
    assert rollout.images.dtype == torch.float32 and bool(torch.isfinite(rollout.images).all())
    log_prob, mean, std = ours.log_prob(rollout.transitions(torch.tensor([0]), torch.tensor([[0, 1, 2]])))
    assert log_prob.dtype == mean.dtype == std.dtype == torch.float32
    log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


# -- training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["use_lora=true", "train.cfg=true"], id="lora-cfg"),
        pytest.param(["use_lora=false", "train.cfg=true"], id="full-cfg"),
        pytest.param(["use_lora=false", "train.cfg=false", "sample.guidance_scale=1.0"], id="full-no-cfg"),
        pytest.param(["use_lora=true", "train.cfg=false", "sample.guidance_scale=1.0"], id="lora-no-cfg"),
        pytest.param(
            ["use_lora=true", "sample.num_steps=5", "pipeline.sde_window=[1,3]", "train.timesteps_per_call=2"],
            id="lora-window",
        ),
        pytest.param(["use_lora=true", "pipeline.sigma_schedule=constant", "pipeline.noise_level=0.3"], id="constant"),
    ],
)
def test_flow_first_step_ratio_is_one(tmp_path, overrides):
    results, comps = first_step_losses(tmp_path, [*FLOW, *overrides], base=())
    assert type(comps.pipeline).__name__ == "FlowMatchingDDPOPipeline"
    assert_ratio_one(results)
    if "pipeline.sde_window=[1,3]" in overrides:
        assert comps.plan.trained_timesteps == 2  # the window's steps, not sample.num_steps
        assert "x 2 of 5 timesteps" in comps.plan.summary(run_config_of(overrides))


def run_config_of(overrides):
    from ddpo.config import run_config

    return run_config(compose([*FLOW, *overrides]))


def test_flow_lora_export_loads_with_load_lora_weights(tmp_path):
    """final/ loads into a fresh tiny SD3 pipeline, holds the trained LoRA (rank 4, alpha 8) and reproduces it."""
    _, comps = run_in_process(tmp_path, [*FLOW, *FAST, "use_lora=true", "pipeline.lora_alpha=8"])
    trained_transformer = comps.pipeline.transformer
    trained = lora_params(trained_transformer)
    assert trained and any(".add_q_proj." in k for k in trained) and not any(".attn2." in k for k in trained)

    pipe = build_tiny_flow_pipeline(seed=0)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "final"))
    loaded = lora_params(pipe.transformer)
    assert set(loaded) == set(trained)
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].float(), rtol=0, atol=0, msg=key)
    with_lora = transformer_output(pipe.transformer)
    assert (with_lora - base).abs().max().item() > 1e-4
    trained_transformer.eval()
    # alpha travels with the file: the loaded adapter has the trained scale (alpha / rank = 2)
    torch.testing.assert_close(with_lora, transformer_output(trained_transformer), rtol=1e-5, atol=1e-5)
    # and the whole diffusers pipeline samples with it
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_flow_full_finetune_exports_the_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    _, comps = run_in_process(tmp_path, [*FLOW, *FAST, "use_lora=false"])
    loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path / "final" / "transformer"))
    trained = dict(comps.pipeline.transformer.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0, msg=name)
    base = build_tiny_flow_pipeline().transformer
    assert (transformer_output(loaded) - transformer_output(base)).abs().max().item() > 1e-4


def test_flow_reference_policy_is_the_base_model_and_kl_trains(tmp_path):
    """Under LoRA the reference (adapters off) scores transitions as the untrained model; kl_coef > 0 logs kl_ref."""
    _, comps = run_in_process(tmp_path, [*FLOW, *FAST, "use_lora=true", "algorithm.kl_coef=0.1"])
    (record,) = read_metrics(tmp_path)
    assert record["kl_ref"] >= 0 and record["grad_norm"] > 0
    pipeline = comps.pipeline
    pipeline.use_wrapped(pipeline.transformer)
    rollout = pipeline.sample(pipeline.encode_prompts(["a cat"]), [torch.Generator().manual_seed(0)])
    batch = rollout.transitions(torch.tensor([0]), torch.tensor([[0, 1, 2]]))
    with torch.no_grad():
        trained, _, _ = pipeline.log_prob(batch)
        with pipeline.reference():
            reference, _, _ = pipeline.log_prob(batch)
        untrained, _, _ = flow_pipeline(guidance_scale=5.0).log_prob(batch)  # the run's sampler (config default)
    torch.testing.assert_close(reference, untrained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, rollout.log_probs[0], rtol=1e-5, atol=1e-5)
    assert (trained - reference).abs().max().item() > 1e-4


def test_flow_run_resumes_exactly(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(reference, [*FLOW, "num_epochs=2"])
    run_in_process(resumed, [*FLOW, "num_epochs=1"])
    run_in_process(resumed, [*FLOW, "num_epochs=2"])
    records = read_metrics(resumed)
    assert [r["epoch"] for r in records] == [0, 1]
    assert_same_epochs(records, read_metrics(reference))


def test_eval_every_uses_the_ode_with_eval_num_steps(tmp_path):
    """eval.every evaluates with the evaluation sampler (the ODE, eval_num_steps), not the training SDE."""
    from ddpo.evaluation import evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    overrides = [*FLOW, "num_epochs=1", "eval.every=1", "eval.seeds=1", "eval.batch_size=4"]
    overrides += ["pipeline.eval_num_steps=4", "prompt=from_file", f"prompt.path={prompts}"]
    _, comps = run_in_process(tmp_path / "run", overrides)
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1]
    pipeline = comps.pipeline
    assert pipeline._eval_schedule.num_steps == 4 and pipeline._train_schedule.num_steps == 3
    rewards = {"reward": comps.reward_fn}
    with pipeline.evaluation():
        ode = evaluate(pipeline, ["a cat", "a dog"], [0], rewards, 4).metrics()["eval_reward_mean"]
    sde = evaluate(pipeline, ["a cat", "a dog"], [0], rewards, 4).metrics()["eval_reward_mean"]
    assert evals[-1]["eval_reward_mean"] == ode != sde


# -- models, fit and loading ------------------------------------------------------------------------
MISMATCHES = {
    "tiny_flow-with-ddim": (["model=tiny_flow", "pipeline=ddim"], ["tiny_flow_model", "use pipeline=flow_sde"]),
    "sd35_medium-with-sdxl": (
        ["model=sd35_medium", "pipeline=sdxl"],
        ["load_stable_diffusion_3", "StableDiffusion3Pipeline", "use pipeline=flow_sde"],
    ),
    "tiny-with-flow_sde": (["model=tiny", "pipeline=flow_sde"], ["tiny_model", "use pipeline=ddim"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_flow_model_and_another_pipeline_do_not_fit(tmp_path, case):
    overrides, words = MISMATCHES[case]
    with pytest.raises(ConfigError) as raised:
        build(compose([*BASE, *overrides]), str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message


class _Unauthorized(Exception):
    """What the Hub's HTTP errors carry: the response, here a 401."""

    response = SimpleNamespace(status_code=401, headers={})


@pytest.mark.parametrize(
    "refusal",
    [
        OSError("Cannot access gated repo for url https://huggingface.co/stabilityai/...: access is restricted"),
        _Unauthorized("Unauthorized"),
    ],
    ids=["gated-message", "http-401"],
)
def test_gated_model_error_says_how_to_log_in(monkeypatch, refusal):
    import diffusers

    import ddpo.network
    from ddpo.models import load_stable_diffusion_3

    def refuse(*args, **kwargs):
        raise OSError("Cannot load model") from refusal

    monkeypatch.setattr(ddpo.network, "work_offline_unless_hub_reachable", lambda: None)
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", refuse)
    with pytest.raises(ConfigError) as raised:
        load_stable_diffusion_3("stabilityai/stable-diffusion-3.5-medium", drop_t5=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "gated" in message and "hf auth login" in message and "HF_TOKEN" in message, message


def test_sd3_arch_is_sd35_medium_sized():
    """The shipped configs build SD3.5 Medium's transformer (2.24B parameters, 2.47B with its position table:
    the "2.5B" of its model card) and 16-channel VAE, on the meta device (no memory)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder = resources.files("ddpo.assets").joinpath("sd35m")
    config = json.loads(folder.joinpath("transformer.json").read_text())
    vae_config = json.loads(folder.joinpath("vae.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (24, 24, 64)
    assert config["dual_attention_layers"] == list(range(13)) and config["qk_norm"] == "rms_norm"
    assert (vae_config["latent_channels"], vae_config["scaling_factor"], vae_config["shift_factor"]) == (
        16,
        1.5305,
        0.0609,
    )
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config(vae_config)
    parameters = sum(p.numel() for p in transformer.parameters())
    positions = transformer.pos_embed.pos_embed.numel()  # a buffer: 384 x 384 positions x 1536
    assert 2.2e9 < parameters < 2.3e9 and 2.4e9 < parameters + positions < 2.5e9, parameters
    assert 70e6 < sum(p.numel() for p in vae.parameters()) < 90e6


@pytest.mark.slow  # CI's budget: the DDIM family's sample.py test stays in the fast suite
def test_sample_script_samples_a_flow_run(tmp_path):
    """scripts/sample.py rebuilds the tiny SD3 base from the run's config and applies its LoRA."""
    from tests.test_sample_script import sample

    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*FLOW, *FAST, "use_lora=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "samples.png"
    result = sample(run_dir, "--prompts", "a cat", "--seeds", "1", "--baseline", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and "LoRA from" in result.stdout


def test_bench_runs_for_the_flow_family():
    """scripts/bench.py times the flow loop and its floor (transformer forward/backward + VAE decode)."""
    from scripts.bench import main

    result = main([*FLOW, "--epochs", "1", "--warmup", "0", "--repeats", "1"])
    calls = result["calls_per_epoch"]
    assert calls["unet_forward"] == 2 * 3 and calls["vae_decode"] == 2
    assert result["floor_per_epoch"]["total_s"] > 0 and result["epoch_over_floor"] > 0


# -- learning (slow) ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="ddpo"),
        pytest.param(["algorithm=grpo", "algorithm.group_size=4"], id="grpo"),
    ],
)
def test_tiny_flow_preset_learns_jpeg_compressibility(tmp_path, overrides):
    started = time.perf_counter()
    result = run_cli(tmp_path, ["experiment=tiny_flow_compressibility", "logger=none", *overrides], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds = time.perf_counter() - started
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == list(range(len(records)))
    trend = trend_in_standard_errors(records)
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-3:]) / 3
    print(f"{overrides}: first 3 {first:.4f}, last 3 {last:.4f}, {trend:.1f} standard errors, {seconds:.0f} s")
    assert trend > 3
    assert seconds < 600


@pytest.mark.slow
def test_tiny_flow_preset_without_learning_has_no_trend(tmp_path):
    overrides = ["experiment=tiny_flow_compressibility", "logger=none", "train.learning_rate=0"]
    result = run_cli(tmp_path, overrides, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    trend = trend_in_standard_errors(read_metrics(tmp_path))
    print(f"learning rate 0: {trend:.1f} standard errors")
    assert abs(trend) < 3
