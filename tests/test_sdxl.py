"""Stable Diffusion XL as a second model family, the model/pipeline fit check, and v-prediction.

The tiny SDXL model (``model=tiny_sdxl pipeline=sdxl``) runs every SDXL code path on the CPU: its
conditioning equals diffusers' own, the first PPO step has ratio 1, its LoRA loads with
``StableDiffusionXLPipeline.load_lora_weights``, and runs resume exactly. The slow tests check that
it (and the tiny v-prediction SD model) learns JPEG compressibility, as the quick start does.

    pytest tests/test_sdxl.py                # fast tests
    pytest -m slow tests/test_sdxl.py        # the learning checks (a few CPU minutes each)
"""

import shutil
import time

import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from ddpo.models.tiny_sdxl import build_tiny_sdxl_pipeline
from tests.conftest import TINY, compose, read_metrics, run_cli, run_in_process
from tests.test_first_step_ratio import first_step_losses
from tests.test_lora_export import assert_lora_export_reproduces, lora_params
from tests.test_quickstart import trend_in_standard_errors
from tests.test_resume import assert_same_epochs

BASE = [o for o in TINY if not o.startswith("model=")]
SDXL = [*BASE, "model=tiny_sdxl", "pipeline=sdxl"]
VPRED = [*BASE, "model=tiny", "model.prediction_type=v_prediction"]
FAST = ["num_epochs=1", "train.learning_rate=1e-2"]  # one epoch visibly moves the weights


def assert_ratio_one(results):
    assert results
    for loss, stats, log_prob, stored, adv in results:
        ratio = torch.exp(log_prob - stored)
        assert torch.all(torch.abs(ratio - 1) < 1e-5), f"ratio {ratio.tolist()}"
        assert stats["approx_kl"].item() < 1e-8
        assert stats["clipfrac"].item() == 0.0
        torch.testing.assert_close(loss.detach(), -adv.mean(), atol=1e-5, rtol=1e-5)
        assert loss.requires_grad


def unet_output(unet, seed=0):
    """The SDXL UNet's prediction on a fixed input (no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled_dim, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), embeds, added_cond_kwargs=added).sample


# -- the SDXL pipeline ---------------------------------------------------------------------------
@pytest.mark.parametrize("force_zeros", [True, False], ids=["zero-negative", "empty-prompt-negative"])
def test_conditioning_is_diffusers_sdxl_conditioning(force_zeros):
    """Prompt embeddings, pooled embeddings, time ids and the negative are what StableDiffusionXLPipeline uses."""
    from ddpo.pipelines import StableDiffusionXLDDPOPipeline

    pipe = build_tiny_sdxl_pipeline()
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    ours = StableDiffusionXLDDPOPipeline(pipe, num_steps=3, eta=1.0, guidance_scale=5.0)
    prompts = ["a cat", "a dog riding a bike"]
    cond = ours.encode_prompts(prompts)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    # the negative is encoded once, at batch size 1 (diffusers encodes it per batch): float noise only
    ours_negative, ours_negative_pooled = ours.negative_conditioning(len(prompts))
    torch.testing.assert_close(ours_negative, negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_negative_pooled, negative_pooled, rtol=0, atol=1e-6)
    assert bool((negative == 0).all()) == force_zeros
    time_ids = pipe._get_add_time_ids(
        (64, 64),
        (0, 0),
        (64, 64),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    torch.testing.assert_close(cond["add_time_ids"], time_ids.expand(2, -1), rtol=0, atol=0)
    # SDXL's scheduler is Euler; the DDIM that replaces it keeps its schedule and does not clip x0
    config = ours.scheduler.config
    assert (config.clip_sample, config.set_alpha_to_one, config.steps_offset) == (False, False, 1)


def test_fp16_keeps_the_force_upcast_vae_in_float32():
    from ddpo.pipelines import StableDiffusionXLDDPOPipeline

    reference = build_tiny_sdxl_pipeline().vae
    ours = StableDiffusionXLDDPOPipeline(build_tiny_sdxl_pipeline(), mixed_precision="fp16", num_steps=3)
    assert ours.vae_upcast and ours.text_encoder_2.dtype == torch.float16
    for (name, p), q in zip(ours.vae.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), name  # its own weights, not fp16-rounded ones
    images = ours.decode(torch.randn(1, 4, 16, 16))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["use_lora=true", "train.cfg=true"], id="lora-cfg"),
        pytest.param(["use_lora=false", "train.cfg=true"], id="full-cfg"),
        pytest.param(["use_lora=false", "train.cfg=false", "sample.guidance_scale=1.0"], id="full-no-guidance"),
    ],
)
def test_sdxl_first_step_ratio_is_one(tmp_path, overrides):
    results, comps = first_step_losses(tmp_path, [*SDXL, *overrides], base=())
    assert type(comps.pipeline).__name__ == "StableDiffusionXLDDPOPipeline"
    assert_ratio_one(results)


def test_sdxl_lora_export_loads_with_load_lora_weights(tmp_path):
    """final/ loads into a fresh tiny SDXL pipeline, equals the trained LoRA and reproduces the trained UNet."""
    _, comps = run_in_process(tmp_path, [*SDXL, *FAST, "use_lora=true"])
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    trained_unet = comps.pipeline.unet
    trained = lora_params(trained_unet)
    assert trained

    assert_lora_export_reproduces(build_tiny_sdxl_pipeline(seed=0), tmp_path / "final", trained_unet, unet_output)


def test_sdxl_full_finetune_exports_the_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    _, comps = run_in_process(tmp_path, [*SDXL, *FAST, "use_lora=false"])
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "final" / "unet"))
    trained = dict(comps.pipeline.unet.named_parameters())
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0, msg=name)
    assert (unet_output(loaded) - unet_output(build_tiny_sdxl_pipeline().unet)).abs().max().item() > 1e-4


def test_sdxl_run_resumes_exactly(tmp_path):
    """A 1-epoch run continued to 2 epochs equals a 2-epoch run."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_in_process(reference, [*SDXL, "num_epochs=2"])
    run_in_process(resumed, [*SDXL, "num_epochs=1"])
    assert [r["epoch"] for r in read_metrics(resumed)] == [0]
    run_in_process(resumed, [*SDXL, "num_epochs=2"])
    records = read_metrics(resumed)
    assert [r["epoch"] for r in records] == [0, 1]
    assert_same_epochs(records, read_metrics(reference))


def test_sdxl_reference_policy_is_the_base_model(tmp_path):
    """Under LoRA the reference (adapters off) scores transitions as the untrained model does."""
    _, comps = run_in_process(tmp_path, [*SDXL, *FAST, "use_lora=true"])
    pipeline = comps.pipeline
    pipeline.use_wrapped(pipeline.unet)
    cond = pipeline.encode_prompts(["a cat"])
    rollout = pipeline.sample(cond, [torch.Generator().manual_seed(0)])
    batch = rollout.transitions(torch.tensor([0]), torch.tensor([[0, 1, 2]]))
    with torch.no_grad():
        trained, _, _ = pipeline.log_prob(batch)
        with pipeline.reference():
            reference, _, _ = pipeline.log_prob(batch)
    from ddpo.pipelines import StableDiffusionXLDDPOPipeline

    base = StableDiffusionXLDDPOPipeline(build_tiny_sdxl_pipeline(), num_steps=3, guidance_scale=5.0)
    with torch.no_grad():
        untrained, _, _ = base.log_prob(batch)
    torch.testing.assert_close(reference, untrained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, rollout.log_probs[0], rtol=1e-5, atol=1e-5)
    assert (trained - reference).abs().max().item() > 1e-4


@pytest.mark.slow  # CI's budget: the DDIM family's sample.py test stays in the fast suite
def test_sample_script_samples_an_sdxl_run(tmp_path):
    """scripts/sample.py rebuilds the tiny SDXL base from the run's config and applies its LoRA."""
    from tests.test_sample_script import sample

    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*SDXL, *FAST, "use_lora=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "samples.png"
    result = sample(run_dir, "--prompts", "a cat", "--seeds", "1", "--baseline", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and "LoRA from" in result.stdout


# -- the model/pipeline fit ----------------------------------------------------------------------
MISMATCHES = {
    # overrides -> words the one-line error must hold
    "sdxl-with-ddim": (
        ["model=sdxl", "pipeline=ddim"],
        ["load_stable_diffusion_xl", "pipeline=ddim", "StableDiffusionXLPipeline", "use pipeline=sdxl"],
    ),
    "tiny_sdxl-with-ddim": (
        ["model=tiny_sdxl", "pipeline=ddim"],
        ["tiny_sdxl_model", "pipeline=ddim", "use pipeline=sdxl"],
    ),
    "tiny-with-sdxl": (
        ["model=tiny", "pipeline=sdxl"],
        ["tiny_model", "pipeline=sdxl", "StableDiffusionPipeline", "use pipeline=ddim"],
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_model_and_pipeline_that_do_not_fit_stop_at_once(tmp_path, case):
    overrides, words = MISMATCHES[case]
    with pytest.raises(ConfigError) as raised:
        build(compose([*BASE, *overrides]), str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message
    assert all(w in message for w in words), message
    assert not (tmp_path / "run").exists(), "the run started before the mismatch was found"


def test_the_loaded_model_is_checked_too(tmp_path):
    """model.path=<an SDXL directory> with the SD loader (which loads it without complaint) is refused."""
    saved = tmp_path / "tiny_sdxl"
    build_tiny_sdxl_pipeline().save_pretrained(saved)
    with pytest.raises(ConfigError, match=r"does not fit pipeline=ddim.*StableDiffusionXLPipeline.*use pipeline=sdxl"):
        build(compose([*BASE, "model=tiny", f"model.path={saved}"]), str(tmp_path / "run"))
    # the SDXL pipeline itself refuses an SD model, whoever builds it
    from ddpo.models.tiny import build_tiny_pipeline
    from ddpo.pipelines import StableDiffusionXLDDPOPipeline

    with pytest.raises(ConfigError, match="StableDiffusionPipeline.*use pipeline=ddim"):
        StableDiffusionXLDDPOPipeline(build_tiny_pipeline())
    shutil.rmtree(saved)


def test_mismatch_on_the_command_line_is_one_line_naming_both_options(tmp_path):
    result = run_cli(tmp_path / "run", [*BASE, "model=sdxl", "pipeline=ddim"], timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model=sdxl does not fit pipeline=ddim"), lines
    assert "use pipeline=sdxl" in lines[-1]
    assert lines[-1] in (tmp_path / "run" / "train.log").read_text()
    assert "cannot load" not in result.stderr  # refused before the (uncached) weights were looked for


# -- v-prediction ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["use_lora=true"], ["use_lora=false"]], ids=["lora", "full"])
def test_v_prediction_first_step_ratio_is_one(tmp_path, overrides):
    results, comps = first_step_losses(tmp_path, [*VPRED, "train.cfg=true", *overrides], base=())
    assert comps.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert_ratio_one(results)


def test_v_prediction_model_trains(tmp_path):
    from ddpo.models.tiny import build_tiny_pipeline

    _, comps = run_in_process(tmp_path, [*VPRED, *FAST, "use_lora=false"])
    (record,) = read_metrics(tmp_path)
    assert record["grad_norm"] > 0 and record["ratio_dev_max"] < 1  # trained, finite
    base = dict(build_tiny_pipeline(prediction_type="v_prediction").unet.named_parameters())
    moved = max((p.detach() - base[name]).abs().max().item() for name, p in comps.pipeline.unet.named_parameters())
    assert moved > 1e-4
    # the default is unchanged: the tiny model predicts epsilon
    assert build_tiny_pipeline().scheduler.config.prediction_type == "epsilon"


# -- learning (slow) ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["experiment=tiny_sdxl_compressibility"], id="tiny_sdxl"),
        pytest.param(["experiment=tiny_compressibility", "model.prediction_type=v_prediction"], id="tiny-v-prediction"),
    ],
)
def test_learns_jpeg_compressibility(tmp_path, overrides):
    started = time.perf_counter()
    result = run_cli(tmp_path, [*overrides, "logger=none"], timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == list(range(len(records)))
    trend = trend_in_standard_errors(records)
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-3:]) / 3
    print(
        f"{overrides}: first 3 {first:.4f}, last 3 {last:.4f}, {trend:.1f} standard errors, "
        f"{time.perf_counter() - started:.0f} s"
    )
    assert trend > 3
