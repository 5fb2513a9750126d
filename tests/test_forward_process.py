"""Forward-process RL: the families' forward processes, the old policy, and DiffusionNFT's identities."""

import contextlib

import numpy as np
import pytest
import torch

from ddpo.algorithms.nft import NFT, adaptive_loss, implicit_policies, optimality
from ddpo.policies import ShadowWeights
from ddpo.schedulers.forward import EpsilonProcess, FlowProcess


# -- the forward processes ---------------------------------------------------------------------
def ddpm_scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_epsilon_family_matches_diffusers_and_inverts_its_target(prediction_type):
    scheduler = ddpm_scheduler(prediction_type)
    process = EpsilonProcess(scheduler.alphas_cumprod, prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([1, 250, 700, 999])
    x_t = process.noise(x0, noise, t)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t))
    target = process.target(x0, noise, t)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, scheduler.get_velocity(x0, noise, t))
    # the clean latent implied by the exact target is x0 (float error grows where sqrt(alpha) is small)
    torch.testing.assert_close(process.x0(target, x_t, t), x0, atol=2e-4, rtol=1e-4)


def test_the_flow_family_is_rectified_flow():
    process = FlowProcess()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_t = process.noise(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(process.x0(process.target(x0, noise, sigma), x_t, sigma), x0)


@pytest.mark.parametrize("process", [EpsilonProcess(ddpm_scheduler().alphas_cumprod), FlowProcess()])
def test_x0_is_affine_in_the_network_output(process):
    """So a mixture of two predictions with weights summing to one is the same mixture in x0 space."""
    x_t, a, b = torch.randn(3, 2, 4, 8, 8, dtype=torch.float64).unbind(0)
    t = torch.tensor([400, 900]) if isinstance(process, EpsilonProcess) else torch.tensor([0.3, 0.9])
    for w in (0.1, 1.0, 2.0, -1.0):
        mixed = process.x0(w * a + (1 - w) * b, x_t, t)
        torch.testing.assert_close(mixed, w * process.x0(a, x_t, t) + (1 - w) * process.x0(b, x_t, t))


# -- the old policy -----------------------------------------------------------------------------
def test_shadow_weights_swap_in_and_blend_by_the_rule():
    layer = torch.nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    shadow = ShadowWeights(params)
    start = {k: v.clone() for k, v in shadow.state_dict().items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    trained = layer.weight.detach().clone()
    with shadow.swapped():
        torch.testing.assert_close(layer.weight.detach(), start["weight"])
    torch.testing.assert_close(layer.weight.detach(), trained)  # back, and still the parameter the optimizer holds
    assert layer.weight is params["weight"]
    shadow.blend(0.25)
    torch.testing.assert_close(shadow.tensors["weight"], 0.25 * start["weight"] + 0.75 * trained)
    with pytest.raises(ValueError, match="missing"):
        shadow.load_state_dict({"weight": trained})


class ToyPipeline:
    """The forward-process interface over a linear denoiser of flow type, with an old policy."""

    def __init__(self, dim=6, dtype=torch.float64):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(dim, dim).to(dtype)
        self.process = FlowProcess()
        self.times = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=dtype)
        self.shadow = ShadowWeights(dict(self.net.named_parameters()))

    def loss_scale(self, steps):
        return torch.ones(steps.shape, dtype=torch.float64)

    def forward_noise(self, batch):
        return torch.randn_like(batch["x0"])

    def noised(self, x0, steps, noise):
        return self.process.noise(x0, noise, self.times[steps])

    def predict_output(self, x_t, steps, conditioning):
        return self.net(x_t)

    def x0_from_output(self, output, x_t, steps):
        return self.process.x0(output, x_t, self.times[steps])

    def predict_x0(self, x_t, steps, conditioning):
        return self.x0_from_output(self.net(x_t), x_t, steps)

    @contextlib.contextmanager
    def old_policy(self):
        with self.shadow.swapped():
            yield

    def update_old_policy(self, decay):
        self.shadow.blend(decay)


def test_half_the_implicit_policies_is_the_old_policy():
    x_theta, x_old = torch.randn(2, 5, 4, 8, 8, dtype=torch.float64).unbind(0)
    for beta in (0.1, 1.0, 3.0):
        positive, negative = implicit_policies(x_theta, x_old, beta)
        torch.testing.assert_close((positive + negative) / 2, x_old, atol=1e-13, rtol=0)


def nft_gradient(pipeline, algorithm, batch, advantages, seed=0):
    pipeline.net.zero_grad()
    torch.manual_seed(seed)  # the loss draws the forward noise
    loss, _ = algorithm.loss(pipeline, batch, advantages)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in pipeline.net.parameters()])


def toy_batch(n=8, dim=6):
    generator = torch.Generator().manual_seed(1)
    return {"x0": torch.randn(n, dim, generator=generator, dtype=torch.float64), "step_index": torch.arange(n) % 4}


def test_nft_on_policy_with_r_one_half_has_no_gradient():
    pipeline, batch = ToyPipeline(), toy_batch()
    algorithm = NFT(group_size=2, beta=1.0, kl_coef=0.0)
    gradient = nft_gradient(pipeline, algorithm, {k: v for k, v in batch.items()}, torch.zeros(8, dtype=torch.float64))
    assert gradient.abs().max() < 1e-12


def test_nft_with_r_one_and_beta_one_is_the_adaptive_weighted_diffusion_loss():
    """r = 1 (every sample the best of its group) and beta = 1: the loss is the plain diffusion loss of
    the trained policy on the samples, under the adaptive weight; off-policy (theta != theta_old) too."""
    pipeline, batch = ToyPipeline(), toy_batch()
    with torch.no_grad():
        pipeline.net.weight.add_(0.3)  # the trained policy has moved away from the old one
    algorithm = NFT(group_size=2, beta=1.0, kl_coef=0.0)
    gradient = nft_gradient(pipeline, algorithm, batch, torch.full((8,), 5.0, dtype=torch.float64))
    pipeline.net.zero_grad()
    torch.manual_seed(0)
    x0 = batch["x0"]
    x_t = pipeline.noised(x0, batch["step_index"], torch.randn_like(x0))
    (5.0 * adaptive_loss(pipeline.predict_x0(x_t, batch["step_index"], batch), x0)).mean().backward()  # x adv_clip_max
    plain = torch.cat([p.grad.flatten() for p in pipeline.net.parameters()])
    assert gradient.abs().max() > 1e-3
    torch.testing.assert_close(gradient, plain, atol=1e-12, rtol=1e-10)


def test_optimality_maps_clipped_advantages_to_zero_one():
    r = optimality(torch.tensor([-9.0, -5.0, 0.0, 2.5, 5.0, 7.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_nft_advantages_are_group_centred_over_the_epoch_std():
    algorithm = NFT(group_size=2)
    rewards = np.array([1.0, 3.0, 10.0, 10.0])
    expected = np.array([-1.0, 1.0, 0.0, 0.0]) / (rewards.std() + 1e-4)
    np.testing.assert_allclose(algorithm.advantages(rewards, ["a", "a", "b", "b"]), expected)


def test_the_old_policy_follows_the_official_schedule():
    pipeline = ToyPipeline()
    algorithm = NFT(group_size=2, old_decay_rate=0.1, old_decay_max=0.25)
    old = pipeline.shadow.tensors["weight"].clone()
    decays = []
    for epoch in range(5):
        with torch.no_grad():
            pipeline.net.weight.add_(1.0)  # an epoch of training: one optimizer step
        algorithm.end_epoch(pipeline, global_step=epoch + 1)
        decays.append(algorithm.last_decay)
        old = decays[-1] * old + (1 - decays[-1]) * pipeline.net.weight.detach()
        torch.testing.assert_close(pipeline.shadow.tensors["weight"], old)
    assert decays == pytest.approx([0.1, 0.2, 0.25, 0.25, 0.25])


# -- rollouts of final samples on the real families ----------------------------------------------------
def tiny_pipeline(kind: str, **options):
    from ddpo.models import tiny_flow_model, tiny_model
    from ddpo.pipelines import FlowMatchingDDPOPipeline, StableDiffusionDDPOPipeline

    if kind == "flow":
        return FlowMatchingDDPOPipeline(tiny_flow_model(), num_steps=4, guidance_scale=1.0, **options)
    return StableDiffusionDDPOPipeline(tiny_model(), num_steps=4, guidance_scale=1.0, **options)


@pytest.mark.parametrize("kind, sampler", [("sd", "ddim"), ("sd", "dpm_solver"), ("flow", "euler"), ("flow", "sde")])
def test_a_final_rollout_stores_no_per_step_tensors(kind, sampler):
    pipeline = tiny_pipeline(kind, sampler=sampler)
    conditioning = pipeline.encode_prompts(["a cat", "a dog"])
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    rollout = pipeline.fill("final", conditioning, generators)
    assert set(rollout.steps) == {"step_index"} and rollout.steps["step_index"].dtype == torch.long
    assert rollout.num_steps == 4 and len(rollout) == 2
    x0 = rollout.conditioning["x0"]
    assert x0.ndim == 4 and torch.isfinite(x0).all()
    # nothing of a latent's size is kept per step: the rollout is the final latents plus the conditioning
    per_step = [v for v in rollout.steps.values() if v.numel() > 2 * 4]
    assert not per_step
    again = pipeline.fill("final", conditioning, [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(again.conditioning["x0"], x0)  # the same seeds, the same samples
    assert torch.equal(again.conditioning["forward_seed"], rollout.conditioning["forward_seed"])


def test_the_deterministic_ddim_sampler_is_diffusers_ddim_at_eta_zero():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = tiny_pipeline("sd", sampler="ddim")
    conditioning = pipeline.encode_prompts(["a cat"])
    ours = pipeline.sample_final(conditioning, [torch.Generator().manual_seed(3)]).conditioning["x0"]
    sd = pipeline.sd
    reference = StableDiffusionPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        scheduler=DDIMScheduler.from_config(sd.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    size = pipeline.resolution // pipeline.vae_scale_factor
    latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(3))
    theirs = reference(
        prompt_embeds=conditioning["prompt_embeds"],
        num_inference_steps=4,
        guidance_scale=1.0,
        eta=0.0,
        latents=latents,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "flow"])
def test_the_forward_noise_follows_the_sample_not_the_batch(kind):
    pipeline = tiny_pipeline(kind)
    conditioning = pipeline.encode_prompts(["a cat", "a dog", "a cow"])
    rollout = pipeline.fill("final", conditioning, [torch.Generator().manual_seed(i) for i in range(3)])
    rows, steps = torch.tensor([2, 0, 1]), torch.tensor([[1, 3], [0, 2], [3, 1]])
    batch = rollout.transitions(rows, steps)
    noise = pipeline.forward_noise(batch)
    alone = pipeline.forward_noise(rollout.transitions(rows[:1], steps[:1]))
    torch.testing.assert_close(noise[:2], alone, rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])  # another step of the same sample: other noise
    x0_hat = pipeline.predict_x0(pipeline.noised(batch["x0"], batch["step_index"], noise), batch["step_index"], batch)
    assert x0_hat.shape == batch["x0"].shape and x0_hat.requires_grad  # with gradients to the trained weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_scale_turns_the_x0_loss_into_the_network_output_loss(prediction_type):
    """On SD's UNets NFT's adaptive loss is taken in the network's own space (epsilon or v), where an x0
    error at the top timestep would weigh about 500 times one at the last."""
    process = EpsilonProcess(ddpm_scheduler(prediction_type).alphas_cumprod, prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0, noise, guess = torch.randn(3, 4, 4, 8, 8, generator=generator, dtype=torch.float64).unbind(0)
    t = torch.tensor([1, 500, 980, 999])
    x_t = process.noise(x0, noise, t)
    x0_hat = process.x0(guess, x_t, t)
    in_x0 = adaptive_loss(x0_hat, x0) / process.output_scale(t)
    torch.testing.assert_close(in_x0, adaptive_loss(guess, process.target(x0, noise, t)))
    scale = process.output_scale(t)
    if prediction_type == "epsilon":
        assert scale[2] / scale[0] > 300


# -- AWM ------------------------------------------------------------------------------------------------
class ToyFlowPipeline(ToyPipeline):
    """ToyPipeline with the network-output interface AWM reads, and a reference (the start)."""

    def __init__(self):
        super().__init__()
        self.start = ShadowWeights(dict(self.net.named_parameters()))

    def predict_output(self, x_t, steps, conditioning):
        return self.net(x_t)

    def output_target(self, x0, noise, steps):
        return self.process.target(x0, noise, self.times[steps])

    def noise_coefficient(self, steps):
        return self.times[steps]

    @contextlib.contextmanager
    def reference(self):
        with self.start.swapped():
            yield


def test_awm_is_on_policy_its_first_ratio_is_one_and_its_gradient_is_advantage_weighted():
    from ddpo.algorithms.awm import AWM, ghuber_log_likelihood

    pipeline, batch = ToyFlowPipeline(), toy_batch()
    algorithm = AWM(group_size=2, kl_coef=0.0, ema_kl_coef=0.0)
    advantages = torch.linspace(-1, 1, 8, dtype=torch.float64)
    torch.manual_seed(0)
    loss, stats = algorithm.loss(pipeline, batch, advantages)
    assert stats["ratio_dev_max"] == 0.0
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in pipeline.net.parameters()])
    # the same as the gradient of -mean(A log p): no clipping acts on-policy
    pipeline.net.zero_grad()
    torch.manual_seed(0)
    x0, steps = batch["x0"], batch["step_index"]
    noise = torch.randn_like(x0)
    output = pipeline.net(pipeline.noised(x0, steps, noise))
    mse = ((output - pipeline.output_target(x0, noise, steps)) ** 2).mean(dim=1)
    (-(advantages * ghuber_log_likelihood(mse, pipeline.times[steps], 0.25)).mean()).backward()
    expected = torch.cat([p.grad.flatten() for p in pipeline.net.parameters()])
    torch.testing.assert_close(gradient, expected, atol=1e-12, rtol=1e-9)


def test_ghuber_is_the_plain_loss_at_power_one_and_flattens_large_errors_below():
    from ddpo.algorithms.awm import ghuber_log_likelihood

    mse, weight = torch.tensor([0.0, 0.5, 4.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(ghuber_log_likelihood(mse, weight, 1.0), -mse)
    quarter = ghuber_log_likelihood(mse, weight, 0.25)
    assert quarter[0] == 0 and quarter[1] > quarter[2]
    # the gradient in the error falls off as mse^(p - 1): large errors weigh less than under the plain loss
    assert -quarter[2] / 4.0 < -quarter[1] / 0.5


def test_awm_advantages_are_clipped_then_scaled():
    from ddpo.algorithms.awm import AWM

    algorithm = AWM(group_size=2, adv_clip_max=1.0, advantage_max=0.5)
    rewards = np.array([0.0, 10.0, 5.0, 5.0, 4.9, 5.1])  # +-1.7, 0, +-0.03 epoch stds from their prompts' means
    advantages = algorithm.advantages(rewards, ["a", "a", "b", "b", "c", "c"])
    np.testing.assert_allclose(
        advantages, [-0.5, 0.5, 0.0, 0.0, -0.05 / rewards.std(), 0.05 / rewards.std()], rtol=1e-3
    )
