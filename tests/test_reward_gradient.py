"""Reward-gradient fine-tuning (DRaFT, AlignProp): the differentiable tail of the sampling chain.

The gradient of a reward through K sampling steps and the decode is checked against central finite
differences of the same function (fixed noise: the generators are re-seeded), in float64 on the tiny
SD model, LoRA adapters included; then what reaches which weights, the algorithms' own checks, and
their runs (resume; the multi-process run is in test_multiprocess.py).
"""

import pytest
import torch

from ddpo.algorithms import AlignProp, DRaFT
from ddpo.errors import ConfigError
from ddpo.models.tiny import build_tiny_pipeline
from ddpo.pipelines.stable_diffusion import StableDiffusionDDPOPipeline
from tests.conftest import TINY, read_metrics, run_in_process


def float64_pipeline(num_steps=3, guidance_scale=3.0):
    """The tiny SD pipeline with every module, the LoRA adapters and the chain in float64."""
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(
        build_tiny_pipeline(), use_lora=True, lora_rank=2, num_steps=num_steps, guidance_scale=guidance_scale
    )
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.double()
    pipeline.dtype = pipeline.chain_dtype = torch.float64
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero (so would A's gradient): give both a random value
        for p in pipeline.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return pipeline


def reward_of(images):
    """A smooth, non-linear reward of the pixels (a fixed random projection through a tanh)."""
    weights = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(7), dtype=images.dtype)
    return torch.tanh(20 * ((images - 0.5) * weights).mean(dim=(1, 2, 3)))


def objective(pipeline, conditioning, grad_steps, checkpoint):
    generator = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    out = pipeline.sample_with_grad(conditioning, generator, grad_steps, checkpoint=checkpoint)
    return reward_of(out.images).mean()


def freeze_prefix(pipeline, grad_steps):
    """Make the steps before the last ``grad_steps`` replay the outputs of the current weights: the
    function DRaFT-K differentiates (the chain's start held fixed, the tail a function of the weights)."""
    original, cache = pipeline.chain_output, {}
    first = pipeline.num_steps - grad_steps

    def chain_output(i, latents, conditioning):
        if i >= first:
            return original(i, latents, conditioning)
        if i not in cache:
            cache[i] = original(i, latents, conditioning).detach()
        return cache[i]

    pipeline.chain_output = chain_output


@pytest.mark.parametrize(
    "num_steps, grad_steps, checkpoint",
    [(1, 1, True), (2, 2, True), (2, 2, False), (3, 1, True), (3, 2, False)],
)
def test_the_reward_gradient_matches_finite_differences_in_float64(num_steps, grad_steps, checkpoint):
    """K = N: the full chain's gradient; K < N: the gradient of the last K steps with the start held fixed."""
    pipeline = float64_pipeline(num_steps=num_steps)
    if grad_steps < num_steps:
        freeze_prefix(pipeline, grad_steps)
    conditioning = pipeline.encode_prompts(["a red circle", "two blue squares"])
    parameters = pipeline.trainable_parameters()
    loss = objective(pipeline, conditioning, grad_steps, checkpoint)
    loss.backward()
    checked = 0
    for p in (parameters[0], parameters[1], parameters[-1]):  # a LoRA A, its B, and the last adapter
        for index in (0, p.numel() // 2):
            analytic = p.grad.reshape(-1)[index].item()
            h = 1e-6
            with torch.no_grad():
                flat = p.data.reshape(-1)
                flat[index] += h
                up = objective(pipeline, conditioning, grad_steps, checkpoint).item()
                flat[index] -= 2 * h
                down = objective(pipeline, conditioning, grad_steps, checkpoint).item()
                flat[index] += h
            numeric = (up - down) / (2 * h)
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10), (p.shape, index)
            checked += abs(numeric) > 1e-8
    assert checked >= 4  # the coordinates were not all flat


def test_a_truncated_gradient_is_not_the_full_chain_s():
    """On a 3-step chain, K = 1 misses what the earlier steps contribute (finite differences of the whole
    chain disagree with it): the truncation is real, not a relabelled full backpropagation."""
    pipeline = float64_pipeline(num_steps=3)
    conditioning = pipeline.encode_prompts(["a red circle", "two blue squares"])
    grads = []
    for k in (1, 3):
        objective(pipeline, conditioning, k, checkpoint=False).backward()
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in pipeline.trainable_parameters()]))
        for p in pipeline.trainable_parameters():
            p.grad = None
    assert (grads[0] - grads[1]).norm() > 1e-2 * grads[1].norm()


def test_only_the_lora_adapters_receive_gradients():
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(build_tiny_pipeline(), use_lora=True, lora_rank=2, num_steps=3)
    conditioning = pipeline.encode_prompts(["a cat", "a dog"])
    generator = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = pipeline.sample_with_grad(conditioning, generator, grad_steps=2)
    out.images.mean().backward()
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        for name, p in module.named_parameters():
            if "lora_" in name:
                assert p.requires_grad and p.grad is not None, name
            else:
                assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in pipeline.unet.named_parameters() if "lora_B" in n)


def test_the_differentiable_chain_is_the_sampled_one():
    """Same generators, same images as ``sample``; DRaFT-LV's first draw re-noises the same clean latent."""
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(build_tiny_pipeline(), num_steps=4, guidance_scale=3.0)
    conditioning = pipeline.encode_prompts(["a cat", "a dog"])

    def generator():
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    sampled = pipeline.sample(conditioning, generator()).images
    for k in (1, 3):
        out = pipeline.sample_with_grad(conditioning, generator(), grad_steps=k)
        torch.testing.assert_close(out.images.detach(), sampled, rtol=0, atol=1e-6)
        assert len(out.step_outputs) == k
    lv = pipeline.sample_with_grad(conditioning, generator(), grad_steps=1, draws=3)
    assert lv.images.shape[0] == 6 and lv.draws == 3
    assert not torch.equal(lv.images[0], lv.images[1])  # fresh noise per draw
    # the last step from a re-noised x0 lands near x0's image (the last step's noise is small)
    assert (lv.images[::3].detach() - sampled).abs().mean() < 0.05


def test_no_step_differentiated_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="with K = 0 no sampling step is differentiated"):
        DRaFT(grad_steps=0)
    with pytest.raises(ConfigError, match="k_min >= 1"):
        AlignProp(truncation=[0, 10])
    with pytest.raises(ConfigError, match="DRaFT-LV"):
        DRaFT(grad_steps=2, draws=2)
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(build_tiny_pipeline(), num_steps=3)
    conditioning = pipeline.encode_prompts(["a cat"])
    with pytest.raises(ConfigError, match="with 0 nothing reaches the trained weights"):
        pipeline.sample_with_grad(conditioning, [torch.Generator().manual_seed(1)], grad_steps=0)
    with pytest.raises(ConfigError, match="exceeds the chain's sample.num_steps=3"):
        DRaFT(grad_steps=4).check_steps(3)


def test_alignprop_draws_its_truncation_from_the_batch_seed():
    algorithm = AlignProp(truncation=[1, None])
    algorithm.check_steps(10)
    draws = [algorithm.steps_of_batch(0, epoch, index) for epoch in range(20) for index in (0, 4)]
    assert set(draws) <= set(range(1, 11)) and len(set(draws)) > 5
    assert draws == [algorithm.steps_of_batch(0, epoch, index) for epoch in range(20) for index in (0, 4)]
    assert DRaFT(grad_steps=3).steps_of_batch(0, 5, 0) == 3


def test_base_decay_pulls_towards_the_starting_weights():
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(build_tiny_pipeline(), use_lora=True, lora_rank=2, num_steps=3)
    algorithm = DRaFT(base_decay=0.5)
    algorithm.start(pipeline)
    rewards = torch.tensor([0.2, 0.4], requires_grad=True)
    loss, stats = algorithm.loss(pipeline, {"rewards": rewards})
    assert loss.item() == pytest.approx(-0.3) and stats["base_distance"].item() == 0
    with torch.no_grad():
        pipeline.trainable_parameters()[0].add_(1.0)
    loss, stats = algorithm.loss(pipeline, {"rewards": rewards})
    moved = pipeline.trainable_parameters()[0].numel()
    assert stats["base_distance"].item() == pytest.approx(moved)
    assert loss.item() == pytest.approx(-0.3 + 0.5 * moved)


# -- runs --------------------------------------------------------------------------------------------
RUN = [*TINY, "reward._target_=tests.fixtures.smooth_rewards.MeanBrightness"]  # the tests set num_epochs


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(["algorithm=draft", "algorithm.grad_steps=2"], id="draft-2"),
        pytest.param(["algorithm=draft", "algorithm.draws=2", "algorithm.base_decay=0.1"], id="draft-lv-decay"),
        pytest.param(["algorithm=alignprop", "use_lora=false"], id="alignprop-full"),
    ],
)
def test_reward_gradient_runs_resume_exactly(tmp_path, algorithm):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_in_process(whole, [*RUN, *algorithm, "num_epochs=3"])
    run_in_process(stopped, [*RUN, *algorithm, "num_epochs=1"])
    run_in_process(stopped, [*RUN, *algorithm, "num_epochs=3"])
    ours, ref = read_metrics(stopped), read_metrics(whole)
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in ref] == [0, 1, 2]
    for a, b in zip(ours, ref):
        for key in ("reward_mean", "loss", "grad_norm", "grad_steps", "global_step"):
            assert a[key] == b[key], key
    assert ref[0]["global_step"] == 2 and ref[0]["grad_norm"] > 0
    assert ref[-1]["reward_mean"] != ref[0]["reward_mean"]  # the weights moved


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["algorithm=draft", "reward=jpeg_compressibility"], "gives no gradients"),
        (["algorithm=draft", "algorithm.grad_steps=0"], "with K = 0 no sampling step is differentiated"),
        (["algorithm=draft", "algorithm.grad_steps=5"], "exceeds the chain's sample.num_steps=3"),
        (
            ["algorithm=draft", "train.gradient_accumulation_steps=3"],
            "train.gradient_accumulation_steps=3 does not divide",
        ),
    ],
)
def test_what_reward_gradients_cannot_train_is_refused_at_start(tmp_path, overrides, words):
    reward = [] if any(o.startswith("reward=") for o in overrides) else [RUN[-1]]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run_in_process(tmp_path / "run", [*RUN[:-1], *reward, *overrides, "num_epochs=1"])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(["model=tiny_sdxl", "pipeline=sdxl"], id="sdxl"),
        pytest.param(["model=tiny_flow", "pipeline=flow_sde", "sample.guidance_scale=3.0"], id="flow"),
    ],
)
def test_draft_trains_every_family(tmp_path, family):
    from safetensors.torch import load_file

    _, components = run_in_process(
        tmp_path / "run", [*RUN, *family, "algorithm=draft", "algorithm.grad_steps=2", "num_epochs=1"]
    )
    record = read_metrics(tmp_path / "run")[0]
    assert record["grad_norm"] > 0 and record["global_step"] == 2
    trained = load_file(tmp_path / "run" / "checkpoints" / "checkpoint_00001" / "trained_weights.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in trained.items())  # B starts at zero


def test_checkpointing_keeps_fewer_activations_for_the_backward_pass():
    """What scripts/bench.py reports as the tail's activation memory: smaller with checkpointing, same gradient."""
    torch.manual_seed(0)
    pipeline = StableDiffusionDDPOPipeline(build_tiny_pipeline(), use_lora=True, lora_rank=2, num_steps=3)
    conditioning = pipeline.encode_prompts(["a cat", "a dog"])
    saved, grads = {}, {}
    for checkpoint in (True, False):
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        generator = [torch.Generator().manual_seed(s) for s in (1, 2)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = pipeline.sample_with_grad(conditioning, generator, grad_steps=2, checkpoint=checkpoint)
        out.images.square().mean().backward()
        saved[checkpoint] = total[0]
        grads[checkpoint] = torch.cat([p.grad.reshape(-1).clone() for p in pipeline.trainable_parameters()])
        for p in pipeline.trainable_parameters():
            p.grad = None
    assert saved[True] < 0.25 * saved[False], saved
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-8)


def test_bench_reports_the_reward_gradient_floor_and_the_tail_memory():
    """scripts/bench.py for algorithm=draft: K forward+backward calls per batch, the rest without gradients."""
    from scripts.bench import main

    overrides = [o for o in RUN if not o.startswith("save_freq")]  # bench.py sets save_freq itself
    result = main(
        [*overrides, "algorithm=draft", "algorithm.grad_steps=2", "--epochs", "1", "--warmup", "0", "--repeats", "1"]
    )
    calls = result["calls_per_epoch"]
    assert calls == {
        "unet_forward": 2 * (3 - 2),
        "unet_forward_backward": 2 * 2,
        "vae_decode_forward_backward": 2,
        "reward_forward_backward": 2,
    }
    memory = result["tail_memory"]
    assert (
        0 < memory["saved_for_backward_mb_with_checkpointing"] < memory["saved_for_backward_mb_without_checkpointing"]
    )
    assert result["floor_per_epoch"]["total_s"] > 0 and result["epoch_over_floor"] > 0


def test_the_hacking_preset_trains_on_the_proxy_and_evaluates_proxy_checker_and_diversity(tmp_path):
    from tests.conftest import compose

    cfg = compose(["experiment=tiny_shapes_hacking"])
    assert cfg.algorithm._target_ == "ddpo.algorithms.DRaFT" and cfg.algorithm.grad_steps == 1
    assert cfg.model._target_ == "ddpo.models.tiny_testbed_model"  # the world where the policy moves
    assert compose(["experiment=tiny_shapes_hacking_hard"]).model._target_ == "ddpo.models.tiny_shapes_model"
    assert cfg.reward._target_ == "ddpo.rewards.shapes.ShapeProxy" and cfg.eval.prompt.split == "heldout"
    assert set(cfg.eval.rewards) == {"shape_proxy", "shape_alignment"}
    small = [
        "logger=none",
        "num_epochs=1",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "train.batch_size=4",
    ]
    run_in_process(tmp_path / "run", ["experiment=tiny_shapes_hacking", *small, "eval.seeds=2", "eval.batch_size=32"])
    record = read_metrics(tmp_path / "run")[0]
    assert record["grad_norm"] > 0
    for key in ("eval_shape_proxy_mean", "eval_shape_alignment_correct", "eval_diversity"):
        assert 0 <= record[key] <= 1, key
