"""The FLUX.1 family (pipeline=flux, ddpo/pipelines/flux.py) on the tiny local FLUX (model=tiny_flux).

What makes FLUX differ from SD3 is checked against diffusers' own FluxPipeline: its conditioning (T5
hidden states, CLIP's pooled output), its schedule (shifted by the packed sequence length), its packed
latents and distilled guidance (the evaluation ODE draws FluxPipeline's images). Training is checked as
for every family: the first ratio is 1, the LoRA loads with ``load_lora_weights``, resume is exact.
"""

import json
import time
from importlib import resources

import numpy as np
import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from ddpo.models.tiny_flux import build_tiny_flux_pipeline
from tests.conftest import TINY, compose, read_metrics, run_cli, run_in_process
from tests.test_first_step_ratio import first_step_losses
from tests.test_lora_export import lora_params
from tests.test_quickstart import trend_in_standard_errors
from tests.test_resume import assert_same_epochs
from tests.test_sdxl import assert_ratio_one

BASE = [o for o in TINY if not o.startswith("model=")]
FLUX = [*BASE, "model=tiny_flux", "pipeline=flux", "pipeline.max_sequence_length=8"]
FAST = ["num_epochs=1", "train.learning_rate=1e-2"]  # one epoch visibly moves the weights


def flux_pipeline(components=None, **kwargs):
    from ddpo.pipelines import FluxDDPOPipeline

    settings = {"num_steps": 3, "max_sequence_length": 8, "resolution": 64, **kwargs}
    return FluxDDPOPipeline(components or build_tiny_flux_pipeline(), **settings)


def packed_noise(seeds, size=16, channels=16):
    """The initial noise of our chain for these seeds, in FluxPipeline's packed layout."""
    from diffusers import FluxPipeline

    noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return noise, FluxPipeline._pack_latents(noise, len(seeds), channels, size, size)


def transformer_output(transformer, seed=0):
    """The FLUX transformer's prediction on a fixed packed input (no gradients)."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(seed)
    config = transformer.config
    tokens = torch.randn(2, 64, config.in_channels, generator=gen)  # 8 x 8 packed tokens
    embeds = torch.randn(2, 8, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=gen)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    guidance = torch.full((2,), 3.5) if config.guidance_embeds else None
    with torch.no_grad():
        return transformer(
            tokens,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=torch.tensor([0.9, 0.1]),
            img_ids=img_ids,
            txt_ids=torch.zeros(8, 3),
            guidance=guidance,
        ).sample


# -- conditioning, schedule and sampling --------------------------------------------------------------
def test_conditioning_is_diffusers_flux_conditioning():
    pipe = build_tiny_flux_pipeline()
    ours = flux_pipeline(pipe)
    prompts = ["a cat", "a dog riding a bike"]
    cond = ours.encode_prompts(prompts)
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=8)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert embeds.shape == (2, 8, 64) and pooled.shape == (2, 32)  # T5's tokens; CLIP's pooled output
    assert not ours.sample_cfg  # distilled guidance: no unconditional pass unless true_cfg_scale > 1


def test_schedule_is_fluxs_resolution_shifted_schedule():
    """Our sigmas are FluxPipeline's (linspace(1, 1/n, n) shifted by mu of the packed sequence length), and at
    noise 0 our step is FlowMatchEulerDiscreteScheduler.step on that schedule, step by step."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from ddpo.schedulers.flow_sde import flow_noise_scale, flow_sde_step

    for resolution in (64, 128):
        pipe = build_tiny_flux_pipeline(resolution=resolution)
        ours = flux_pipeline(pipe, num_steps=6, resolution=resolution)
        schedule = ours._schedule(6)
        scheduler = pipe.scheduler
        config = scheduler.config
        tokens = (resolution // 8) ** 2  # (latent side / 2) ** 2 packed tokens
        mu = calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        timesteps, _ = retrieve_timesteps(scheduler, 6, "cpu", sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        torch.testing.assert_close(schedule.sigmas.cpu(), scheduler.sigmas.cpu(), rtol=0, atol=1e-6)
        torch.testing.assert_close(schedule.timesteps.cpu(), timesteps.cpu(), rtol=0, atol=1e-4)
        assert float(schedule.sigmas[1]) > 1 - 1 / 6  # shifted towards noise: not the plain linspace
        gen = torch.Generator().manual_seed(resolution)
        for i, timestep in enumerate(scheduler.timesteps):
            sample = torch.randn(2, 16, 4, 4, generator=gen)
            velocity = torch.randn(2, 16, 4, 4, generator=gen)
            expected = scheduler.step(velocity, timestep, sample, return_dict=False)[0]
            sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            scale = flow_noise_scale(sigma, sigma_next, noise_level=0.0)
            step, *_ = flow_sde_step(velocity, sample, sigma, sigma_next, scale, generator=[torch.Generator()] * 2)
            torch.testing.assert_close(step, expected, rtol=0, atol=1e-5)


def test_a_fixed_shift_replaces_the_dynamic_one():
    """pipeline.shift=3 (DanceGRPO): sigmas = 3 s / (1 + 2 s) of linspace(1, 1/n, n) at any resolution."""
    s = torch.linspace(1, 1 / 6, 6)
    expected = torch.cat([3 * s / (1 + 2 * s), torch.zeros(1)])
    for resolution in (64, 128):
        ours = flux_pipeline(
            build_tiny_flux_pipeline(resolution=resolution), num_steps=6, resolution=resolution, shift=3.0
        )
        torch.testing.assert_close(ours._train_schedule.sigmas.cpu(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="pipeline.shift"):
        flux_pipeline(shift=0.0)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-like", "schnell-like"])
def test_evaluation_sampler_is_diffusers_flux_pipeline(guidance):
    """In evaluation mode the pipeline samples the ODE with eval_num_steps: what FluxPipeline draws, with
    its distilled guidance (3.5) fed to the transformer (dev) or no guidance input (schnell)."""
    pipe = build_tiny_flux_pipeline(guidance=guidance)
    pipe.set_progress_bar_config(disable=True)
    ours = flux_pipeline(pipe, num_steps=2, eval_num_steps=4)
    assert ours.guidance_embeds == guidance
    prompts = ["a cat", "a horse"]
    with ours.evaluation():
        rollout = ours.sample(ours.encode_prompts(prompts), [torch.Generator().manual_seed(s) for s in (3, 4)])
    assert rollout.log_probs.shape == (2, 0)  # the ODE stores no transitions
    _, packed = packed_noise((3, 4))
    expected = pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=64,
        width=64,
        latents=packed,
        max_sequence_length=8,
        output_type="pt",
    ).images
    torch.testing.assert_close(rollout.images, expected, rtol=0, atol=1e-4)
    if guidance:  # the guidance input matters: another scale draws other images
        other = pipe(
            prompts, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, latents=packed,
            max_sequence_length=8, output_type="pt",
        ).images  # fmt: skip
        assert (other - expected).abs().max().item() > 1e-4
    # outside evaluation: the SDE with num_steps steps, every one stored, re-scored to its log probs
    rollout = ours.sample(ours.encode_prompts(prompts), [torch.Generator().manual_seed(s) for s in (3, 4)])
    assert rollout.log_probs.shape == (2, 2)
    assert rollout.steps["latents"].shape == (2, 2, 16, 16, 16)  # the VAE's layout, not the packed one
    batch = rollout.transitions(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0]]))
    with torch.no_grad():
        log_prob, _, std = ours.log_prob(batch)
    torch.testing.assert_close(log_prob, batch["log_probs"], rtol=0, atol=1e-5)
    assert bool((std > 0).all())


def test_true_cfg_is_off_unless_asked():
    assert not flux_pipeline().sample_cfg
    pipe = build_tiny_flux_pipeline()
    ours = flux_pipeline(pipe, true_cfg_scale=2.0)
    assert ours.sample_cfg
    negative, negative_pooled = ours.negative_conditioning(2)
    embeds, pooled, _ = pipe.encode_prompt([""] * 2, None, device="cpu", max_sequence_length=8)
    torch.testing.assert_close(negative, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(negative_pooled, pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,words", [({"guidance_scale": -1.0}, ["guidance_scale", ">= 0"]), ({"noise_level": 0.0}, ["noise_level"])]
)
def test_bad_flux_settings_are_one_line(kwargs, words):
    with pytest.raises(ConfigError) as raised:
        flux_pipeline(**kwargs)
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message


# -- training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["use_lora=true"], id="lora"),
        pytest.param(["use_lora=false"], id="full"),
        pytest.param(["use_lora=true", "sample.num_steps=5", "pipeline.sde_window=[1,3]"], id="lora-window"),
        pytest.param(["use_lora=true", "pipeline.true_cfg_scale=2.0", "train.cfg=true"], id="lora-true-cfg"),
    ],
)
def test_flux_first_step_ratio_is_one(tmp_path, overrides):
    results, comps = first_step_losses(tmp_path, [*FLUX, *overrides], base=())
    assert type(comps.pipeline).__name__ == "FluxDDPOPipeline"
    assert_ratio_one(results)


def test_flux_lora_targets_the_attention_of_both_block_kinds(tmp_path):
    _, comps = run_in_process(tmp_path, [*FLUX, *FAST, "use_lora=true"])
    trained = lora_params(comps.pipeline.transformer)
    assert any("transformer_blocks.0.attn.add_q_proj" in k for k in trained)  # double-stream, text side
    assert any("single_transformer_blocks.0.attn.to_q" in k for k in trained)  # single-stream
    assert not any("ff." in k or "proj_mlp" in k for k in trained)


def test_flux_lora_export_loads_with_load_lora_weights(tmp_path):
    """final/ loads into a freshly built tiny FLUX pipeline with load_lora_weights and changes its output."""
    _, comps = run_in_process(tmp_path, [*FLUX, *FAST, "use_lora=true", "pipeline.lora_alpha=8"])
    trained_transformer = comps.pipeline.transformer
    trained = lora_params(trained_transformer)
    pipe = build_tiny_flux_pipeline(seed=0)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "final"))
    loaded = lora_params(pipe.transformer)
    assert set(loaded) == set(trained) and trained
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].float(), rtol=0, atol=0, msg=key)
    with_lora = transformer_output(pipe.transformer)
    assert (with_lora - base).abs().max().item() > 1e-4
    trained_transformer.eval()
    torch.testing.assert_close(with_lora, transformer_output(trained_transformer), rtol=1e-5, atol=1e-5)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_flux_full_finetune_exports_the_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel

    _, comps = run_in_process(tmp_path, [*FLUX, *FAST, "use_lora=false"])
    loaded = FluxTransformer2DModel.from_pretrained(str(tmp_path / "final" / "transformer"))
    trained = dict(comps.pipeline.transformer.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0, msg=name)
    base = build_tiny_flux_pipeline().transformer
    assert (transformer_output(loaded) - transformer_output(base)).abs().max().item() > 1e-4


def test_flux_kl_to_the_reference_trains(tmp_path):
    _, comps = run_in_process(tmp_path, [*FLUX, *FAST, "use_lora=true", "algorithm.kl_coef=0.1"])
    (record,) = read_metrics(tmp_path)
    assert record["kl_ref"] >= 0 and record["grad_norm"] > 0


@pytest.mark.parametrize("algorithm", ["grpo", "nft", "awm"])
def test_flux_trains_with_each_algorithm_family(tmp_path, algorithm):
    """Policy gradient (GRPO) and the forward process (NFT, AWM) train the FLUX transformer, unchanged."""
    overrides = [*FLUX, *FAST, "use_lora=true", f"algorithm={algorithm}", "algorithm.group_size=2"]
    if algorithm != "grpo":
        overrides.append("pipeline.sampler=sde")
    run_in_process(tmp_path, overrides)
    (record,) = read_metrics(tmp_path)
    assert record["grad_norm"] > 0 and all(np.isfinite(v) for v in record.values() if isinstance(v, float))


def test_flux_run_resumes_exactly(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(reference, [*FLUX, "num_epochs=2"])
    run_in_process(resumed, [*FLUX, "num_epochs=1"])
    run_in_process(resumed, [*FLUX, "num_epochs=2"])
    records = read_metrics(resumed)
    assert [r["epoch"] for r in records] == [0, 1]
    assert_same_epochs(records, read_metrics(reference))


# -- models, fit and loading ------------------------------------------------------------------------
MISMATCHES = {
    "tiny_flux-with-flow_sde": (["model=tiny_flux", "pipeline=flow_sde"], ["tiny_flux_model", "use pipeline=flux"]),
    "tiny_flow-with-flux": (["model=tiny_flow", "pipeline=flux"], ["tiny_flow_model", "use pipeline=flow_sde"]),
    "flux_dev-with-ddim": (["model=flux_dev", "pipeline=ddim"], ["load_flux", "FluxPipeline", "use pipeline=flux"]),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_flux_model_and_another_pipeline_do_not_fit(tmp_path, case):
    overrides, words = MISMATCHES[case]
    with pytest.raises(ConfigError) as raised:
        build(compose([*BASE, *overrides]), str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_flux_dev_gated_error_says_how_to_log_in(monkeypatch):
    import diffusers

    import ddpo.network
    from ddpo.models import load_flux

    def refuse(*args, **kwargs):
        raise OSError("Cannot load model") from OSError("Cannot access gated repo for url https://huggingface.co/...")

    monkeypatch.setattr(ddpo.network, "work_offline_unless_hub_reachable", lambda: None)
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", refuse)
    with pytest.raises(ConfigError) as raised:
        load_flux("black-forest-labs/FLUX.1-dev")
    message = str(raised.value)
    assert "\n" not in message and "gated" in message and "hf auth login" in message, message


def test_flux_hub_models_name_the_published_checkpoints():
    """flux_dev / flux_schnell load the Hub's repositories with the published sampling settings."""
    dev = compose([*BASE, "model=flux_dev", "pipeline=flux"])
    schnell = compose([*BASE, "model=flux_schnell", "pipeline=flux"])
    assert dev.model.path == "black-forest-labs/FLUX.1-dev" and dev.model._target_ == "ddpo.models.load_flux"
    assert schnell.model.path == "black-forest-labs/FLUX.1-schnell"


def test_flux_arch_is_flux1_dev_sized():
    """The shipped configs build FLUX.1-dev's transformer (11.9B parameters: the "12B" of its model card) and
    its 16-channel VAE, on the meta device (no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    folder = resources.files("ddpo.assets").joinpath("flux1_dev")
    config = json.loads(folder.joinpath("transformer.json").read_text())
    vae_config = json.loads(folder.joinpath("vae.json").read_text())
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (19, 38, 24)
    assert config["guidance_embeds"] and list(config["axes_dims_rope"]) == [16, 56, 56]
    assert (vae_config["latent_channels"], vae_config["scaling_factor"], vae_config["shift_factor"]) == (
        16,
        0.3611,
        0.1159,
    )
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
        vae = AutoencoderKL.from_config(vae_config)
    parameters = sum(p.numel() for p in transformer.parameters())
    assert 11.8e9 < parameters < 12.0e9, parameters
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6


def test_bench_runs_for_flux():
    """scripts/bench.py times the FLUX loop and its floor (transformer forward/backward on packed latents + decode)."""
    from scripts.bench import main

    result = main([*FLUX, "--epochs", "1", "--warmup", "0", "--repeats", "1"])
    calls = result["calls_per_epoch"]
    assert calls["unet_forward"] == 2 * 3 and calls["vae_decode"] == 2
    assert result["floor_per_epoch"]["total_s"] > 0 and result["epoch_over_floor"] > 0


@pytest.mark.slow
def test_bench_runs_on_flux1_dev_widths():
    """The same on FLUX.1-dev's widths (one block of each kind, 64 px): about a minute on 2 cores."""
    from scripts.bench import main

    overrides = [*BASE, "model=flux_arch", "pipeline=flux", "model.resolution=64", "model.num_layers=1"]
    overrides += ["model.num_single_layers=1", "pipeline.max_sequence_length=8", "sample.num_steps=2"]
    overrides += ["sample.batch_size=1", "train.batch_size=1"]
    result = main([*overrides, "--epochs", "1", "--warmup", "0", "--repeats", "1"])
    calls = result["calls_per_epoch"]
    assert calls["unet_forward"] == 2 * 2 and calls["vae_decode"] == 2
    assert result["floor_per_epoch"]["total_s"] > 0 and result["epoch_over_floor"] > 0


# -- learning (slow) ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["algorithm=grpo", "algorithm.group_size=4"], id="grpo"),
        pytest.param(["algorithm=nft"], id="nft"),
    ],
)
def test_tiny_flux_preset_learns_jpeg_compressibility(tmp_path, overrides):
    started = time.perf_counter()
    result = run_cli(tmp_path, ["experiment=tiny_flux_compressibility", "logger=none", *overrides], timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds = time.perf_counter() - started
    records = read_metrics(tmp_path)
    trend = trend_in_standard_errors(records)
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-3:]) / 3
    print(f"{overrides}: first 3 {first:.4f}, last 3 {last:.4f}, {trend:.1f} standard errors, {seconds:.0f} s")
    assert trend > 3


@pytest.mark.slow
def test_tiny_flux_preset_without_learning_has_no_trend(tmp_path):
    overrides = ["experiment=tiny_flux_compressibility", "logger=none", "algorithm=grpo", "train.learning_rate=0"]
    result = run_cli(tmp_path, overrides, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    trend = trend_in_standard_errors(read_metrics(tmp_path))
    print(f"learning rate 0: {trend:.1f} standard errors")
    assert abs(trend) < 3


def test_dancegrpo_preset_holds_the_published_settings():
    """experiment=dancegrpo_flux_hps composes with DanceGRPO's LoRA recipe; its LoRA targets adapt only the
    image stream's attention (no add_* projections) and its schedule is the fixed shift 3."""
    from ddpo.pipelines import FluxDDPOPipeline

    cfg = compose(["experiment=dancegrpo_flux_hps", "prompt.path=prompts.txt"])
    assert cfg.model.path == "black-forest-labs/FLUX.1-dev" and cfg.model.resolution == 720
    p = cfg.pipeline
    assert (p.shift, p.sigma_schedule, p.noise_level, p.guidance_scale, p.true_cfg_scale) == (
        3.0,
        "constant",
        0.3,
        3.5,
        1.0,
    )
    assert (cfg.sample.num_steps, cfg.algorithm.group_size, cfg.algorithm.shared_noise) == (12, 12, True)
    assert (cfg.lora_rank, p.lora_alpha, cfg.train.learning_rate, cfg.train.timestep_fraction) == (128, 256, 3e-4, 0.6)
    assert (cfg.train.clip_range, cfg.algorithm.kl_coef) == (1e-4, 0.0)
    ours = FluxDDPOPipeline(
        build_tiny_flux_pipeline(),
        num_steps=12,
        max_sequence_length=8,
        resolution=64,
        lora_targets=list(p.lora_targets),
        shift=p.shift,
        sigma_schedule=p.sigma_schedule,
        noise_level=p.noise_level,
    )
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in ours.transformer.named_parameters() if ".lora_A" in n}
    assert "transformer_blocks.0.attn.to_q" in adapted and "single_transformer_blocks.0.attn.to_v" in adapted
    assert not any("add_" in n or "to_add_out" in n for n in adapted), adapted
    s = torch.linspace(1, 1 / 12, 12)
    torch.testing.assert_close(ours._train_schedule.sigmas[:-1].cpu(), 3 * s / (1 + 2 * s), rtol=0, atol=1e-6)
