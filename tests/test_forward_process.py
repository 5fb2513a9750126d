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

    def noised(self, x0, steps, noise):
        return self.process.noise(x0, noise, self.times[steps])

    def predict_x0(self, x_t, steps, conditioning):
        return self.process.x0(self.net(x_t), x_t, self.times[steps])

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
    algorithm = NFT(group_size=2, beta=1.0)
    gradient = nft_gradient(pipeline, algorithm, {k: v for k, v in batch.items()}, torch.zeros(8, dtype=torch.float64))
    assert gradient.abs().max() < 1e-12


def test_nft_with_r_one_and_beta_one_is_the_adaptive_weighted_diffusion_loss():
    """r = 1 (every sample the best of its group) and beta = 1: the loss is the plain diffusion loss of
    the trained policy on the samples, under the adaptive weight; off-policy (theta != theta_old) too."""
    pipeline, batch = ToyPipeline(), toy_batch()
    with torch.no_grad():
        pipeline.net.weight.add_(0.3)  # the trained policy has moved away from the old one
    algorithm = NFT(group_size=2, beta=1.0)
    gradient = nft_gradient(pipeline, algorithm, batch, torch.full((8,), 5.0, dtype=torch.float64))
    pipeline.net.zero_grad()
    torch.manual_seed(0)
    x0 = batch["x0"]
    x_t = pipeline.noised(x0, batch["step_index"], torch.randn_like(x0))
    adaptive_loss(pipeline.predict_x0(x_t, batch["step_index"], batch), x0).mean().backward()
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
    for _ in range(5):
        with torch.no_grad():
            pipeline.net.weight.add_(1.0)  # an epoch of training
        algorithm.end_epoch(pipeline, global_step=0)
        decays.append(algorithm.last_decay)
        old = decays[-1] * old + (1 - decays[-1]) * pipeline.net.weight.detach()
        torch.testing.assert_close(pipeline.shadow.tensors["weight"], old)
    assert decays == pytest.approx([0.0, 0.1, 0.2, 0.25, 0.25])
    assert algorithm.state_dict() == {"updates": 5}
