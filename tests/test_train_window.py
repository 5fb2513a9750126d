"""pipeline.train_window for DDIM: every step samples, only the window's transitions are stored and trained."""

import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from tests.conftest import TINY, compose, read_metrics, run_in_process


def tiny_pipeline(tmp_path, *overrides):
    _, comps = build(compose([*TINY, "sample.num_steps=4", *overrides]), str(tmp_path))
    return comps.pipeline


def test_window_keeps_the_same_chain_and_stores_only_its_steps(tmp_path):
    full = tiny_pipeline(tmp_path / "full")
    windowed = tiny_pipeline(tmp_path / "window", "pipeline.train_window=[1,3]")
    assert full.stored_steps is None and windowed.stored_steps == 2
    cond = full.encode_prompts(["a cat", "a dog"])

    def rollout(pipeline):
        return pipeline.sample(cond, [torch.Generator().manual_seed(s) for s in (5, 6)])

    a, b = rollout(full), rollout(windowed)
    # the window changes what is stored, not what is sampled
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert b.log_probs.shape == (2, 2) and b.steps["latents"].shape[1] == 2
    for key in ("timesteps", "latents", "next_latents", "log_probs"):
        torch.testing.assert_close(b.steps[key], a.steps[key][:, 1:3], rtol=0, atol=0)
    # the stored transitions re-score to their sampled log probs (the right timestep with each latent)
    batch = b.transitions(torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0]]))
    with torch.no_grad():
        log_prob, _, _ = windowed.log_prob(batch)
    torch.testing.assert_close(log_prob, batch["log_probs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", ["[2,2]", "[0,5]", "[-1,2]"])
def test_bad_window_is_one_line(tmp_path, window):
    with pytest.raises(ConfigError) as info:
        tiny_pipeline(tmp_path, f"pipeline.train_window={window}")
    message = str(info.value)
    assert "pipeline.train_window" in message and "num_steps=4" in message and "\n" not in message


def test_plan_counts_the_window_steps(tmp_path):
    """timestep_fraction is a fraction of the window's steps, as for the flow pipeline's SDE window."""
    for fraction, trained in (("1.0", 2), ("0.5", 1)):
        _, comps = build(
            compose(
                [*TINY, "sample.num_steps=4", "pipeline.train_window=[0,2]", f"train.timestep_fraction={fraction}"]
            ),
            str(tmp_path / fraction),
        )
        assert comps.plan.trained_timesteps == trained


def test_run_with_a_window(tmp_path):
    run_in_process(tmp_path, [*TINY, "sample.num_steps=4", "pipeline.train_window=[0,2]", "num_epochs=1"])
    (record,) = read_metrics(tmp_path)
    assert record["num_samples"] == 4 and record["loss"] == record["loss"]
