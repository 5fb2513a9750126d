"""Rewards inside the real training loop: aesthetic on the tiny model, and mix logging."""

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, read_metrics, run_in_process

SHARED_HEAD = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "assets"
    / "laion-aesthetic"
    / ("sac+logos+ava1-l14-linearMSE.pth")
)


@pytest.fixture
def head_overrides(tmp_path):
    """The real LAION head when ../shared has it, else a random head of the same layout."""
    if SHARED_HEAD.is_file():
        return [f"reward.head_path={SHARED_HEAD}"]
    from rewards.aesthetic_head import AestheticHead

    torch.manual_seed(0)
    path = tmp_path / "random_head.pth"
    torch.save(AestheticHead(input_dim=768).state_dict(), path)
    return [f"reward.head_path={path}", "reward.head_sha256=null"]


def test_aesthetic_reward_trains_the_tiny_model_end_to_end(tmp_path, head_overrides):
    """Sampling -> aesthetic score (tiny local CLIP + head) -> advantages -> PPO step, one epoch."""
    run_dir = tmp_path / "run"
    overrides = (
        TINY
        + ["num_epochs=1", "reward=aesthetic", "reward.clip_model=tiny-test", "reward.clip_pretrained=null"]
        + head_overrides
    )
    final_reward, components = run_in_process(run_dir, overrides)
    (record,) = read_metrics(run_dir)
    assert type(components.reward_fn).__name__ == "AestheticReward"
    assert record["epoch"] == 0 and record["num_samples"] == 4
    assert record["global_step"] == 2  # 4 samples / train.batch_size 2
    assert torch.isfinite(torch.tensor([record["reward_mean"], record["loss"]])).all()
    assert record["reward_std"] > 0  # four different images got different scores
    assert final_reward == pytest.approx(record["reward_mean"])
    # the reward model is never trained nor saved
    assert not any(p.requires_grad for p in components.reward_fn.head.parameters())
    checkpoint = next((run_dir / "checkpoints").iterdir())
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "trained_weights.safetensors")
    assert saved and all("lora" in key for key in saved)


def test_mix_logs_every_component_and_the_weighted_total(tmp_path):
    run_dir = tmp_path / "run"
    overrides = TINY + [
        "num_epochs=1",
        "reward=mix",
        "reward.components.compressibility.weight=2.0",
        "+reward.components.size={weight: 0.5, reward: {_target_: rewards.jpeg.JpegIncompressibility}}",
    ]
    run_in_process(run_dir, overrides)
    (record,) = read_metrics(run_dir)
    compress, size = record["reward_compressibility_mean"], record["reward_size_mean"]
    assert compress == pytest.approx(-size)  # both components see the same images
    assert record["reward_mean"] == pytest.approx(2.0 * compress + 0.5 * size, rel=1e-5)
