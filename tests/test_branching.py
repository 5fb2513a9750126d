"""GRPO's branched chains (algorithm.branch_window): a group shares all its noise but one step's."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ddpo.config import build
from ddpo.errors import ConfigError
from ddpo.trainer import sample_epoch
from tests.conftest import TINY, compose, run_cli

GRPO = ["algorithm=grpo", "algorithm.group_size=2", "sample.num_steps=4"]
FLOW = ["model=tiny_flow", "pipeline=flow_sde", "pipeline.max_sequence_length=8"]


def test_pipeline_branches_a_group_at_its_step(tmp_path):
    _, comps = build(compose([*TINY, "sample.num_steps=4"]), str(tmp_path))
    pipeline = comps.pipeline
    cond = pipeline.encode_prompts(["a cat"] * 4)
    own = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    shared = [torch.Generator().manual_seed(s) for s in (7, 7, 8, 8)]  # two groups of two
    rollout = pipeline.sample(cond, own, shared_generator=shared, branch_steps=[1, 1, 2, 2])
    steps = rollout.steps
    assert rollout.log_probs.shape == (4, 1)
    pipeline.scheduler.set_timesteps(4)
    assert steps["timesteps"][:, 0].tolist() == pipeline.scheduler.timesteps[[1, 1, 2, 2]].tolist()
    for a, b in ((0, 1), (2, 3)):
        # the chains agree up to the branch step (the same x_T and shared noise before it) ...
        torch.testing.assert_close(steps["latents"][a], steps["latents"][b], rtol=0, atol=0)
        # ... and part there
        assert not torch.equal(steps["next_latents"][a], steps["next_latents"][b])
        assert not torch.equal(rollout.images[a], rollout.images[b])
    # the groups draw different shared noise
    assert not torch.equal(steps["latents"][0], steps["latents"][2])
    # the stored transition is the branch step's: it re-scores to its sampled log prob
    batch = rollout.transitions(torch.arange(4), torch.zeros(4, 1, dtype=torch.long))
    with torch.no_grad():
        log_prob, _, _ = pipeline.log_prob(batch)
    torch.testing.assert_close(log_prob, batch["log_probs"], rtol=0, atol=1e-5)
    # the shared noise is not the own noise: without branching the same generators give other chains
    plain = pipeline.sample(cond, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)])
    assert not torch.equal(plain.images[0], rollout.images[0])


def test_flow_pipeline_branches_with_the_ode_elsewhere(tmp_path):
    """TempFlow-GRPO's branching: the SDE at the branch step, the deterministic ODE at every other."""
    from ddpo.schedulers.flow_sde import flow_ode_step

    _, comps = build(compose([*TINY, *FLOW, "sample.num_steps=4"]), str(tmp_path))
    pipeline = comps.pipeline
    cond = pipeline.encode_prompts(["a cat"] * 4)
    own = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    shared = [torch.Generator().manual_seed(s) for s in (7, 7, 8, 8)]
    rollout = pipeline.sample(cond, own, shared_generator=shared, branch_steps=[1, 1, 3, 3])
    steps = rollout.steps
    assert steps["step_index"][:, 0].tolist() == [1, 1, 3, 3] and rollout.log_probs.shape == (4, 1)
    for a, b in ((0, 1), (2, 3)):
        torch.testing.assert_close(steps["latents"][a], steps["latents"][b], rtol=0, atol=0)
        assert not torch.equal(steps["next_latents"][a], steps["next_latents"][b])
    # before its branch step the chain is the ODE from the shared initial noise
    latents = torch.stack([torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    schedule = pipeline._train_schedule
    with torch.no_grad():
        two = {key: value[:2] for key, value in cond.items()}
        velocity = pipeline._velocity(latents, schedule.timesteps[0].expand(2), two, cfg=True)
        latents = flow_ode_step(velocity, latents, schedule.sigmas[0], schedule.sigmas[1])
    torch.testing.assert_close(steps["latents"][0, 0], latents[0], rtol=0, atol=1e-5)
    batch = rollout.transitions(torch.arange(4), torch.zeros(4, 1, dtype=torch.long))
    with torch.no_grad():
        log_prob, _, _ = pipeline.log_prob(batch)
    torch.testing.assert_close(log_prob, batch["log_probs"], rtol=0, atol=1e-5)


def test_flow_branched_run(tmp_path):
    result = run_cli(tmp_path, [*TINY, *FLOW, *GRPO, "num_epochs=1", "algorithm.branch_window=[0,3]"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each group branching at one step of [0, 3]" in (tmp_path / "train.log").read_text()


def test_epoch_of_branched_groups(tmp_path):
    run, comps = build(
        compose([*TINY, *GRPO, "algorithm.branch_window=[1,3]", "sample.num_batches_per_epoch=3"]), str(tmp_path)
    )
    assert comps.plan.trained_timesteps == 1
    with ThreadPoolExecutor(max_workers=1) as executor:
        samples = sample_epoch(comps, run, 0, executor)
    steps = samples.batch.steps
    assert steps["latents"].shape[1] == 1
    comps.pipeline.scheduler.set_timesteps(4)
    index = {int(t): i for i, t in enumerate(comps.pipeline.scheduler.timesteps)}
    branch = [index[int(t)] for t in steps["timesteps"][:, 0]]
    assert all(1 <= k < 3 for k in branch)
    for i in range(0, 6, 2):  # groups span sampling batches
        assert branch[i] == branch[i + 1]
        torch.testing.assert_close(steps["latents"][i], steps["latents"][i + 1], rtol=0, atol=0)
        assert not torch.equal(steps["next_latents"][i], steps["next_latents"][i + 1])
    # across epochs the groups branch at different steps of the window
    seen = set(branch)
    for epoch in range(1, 6):
        seen |= {comps.algorithm.branch_step(run.seed, epoch, 2 * g) for g in range(3)}
    assert seen == {1, 2}


def test_branched_run_trains_and_says_so(tmp_path):
    result = run_cli(tmp_path, [*TINY, *GRPO, "num_epochs=1", "algorithm.branch_window=[0,2]"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each group branching at one step of [0, 2]" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["algorithm.branch_window=[2,1]"], ["algorithm.branch_window", "start < end"]),
        (["algorithm.branch_window=[0,5]"], ["algorithm.branch_window", "sample.num_steps=4"]),
        (["algorithm.branch_window=[0,2]", "pipeline.train_window=[0,2]"], ["branch_window", "train_window"]),
        ([*FLOW, "algorithm.branch_window=[0,2]", "pipeline.sde_window=[0,3]"], ["branch_window", "sde_window"]),
    ],
    ids=["reversed", "past-the-chain", "with-train-window", "with-sde-window"],
)
def test_bad_branching_is_one_line(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as info:
        build(compose([*TINY, *GRPO, *overrides]), str(tmp_path))
    message = str(info.value)
    assert all(word in message for word in words), message
    assert "\n" not in message
