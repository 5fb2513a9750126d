"""The final weights load with diffusers' standard APIs and reproduce the trained policy."""

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from ddpo.models.tiny import build_tiny_pipeline
from tests.conftest import TINY, run_in_process

# tiny runs with a learning rate high enough that one epoch visibly moves the weights
FAST = TINY + ["num_epochs=1", "train.learning_rate=1e-2"]


def unet_output(unet, seed=0):
    """The UNet's prediction on a fixed input (no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.tensor([500, 20])
    with torch.no_grad():
        return unet(latents, timesteps, embeds).sample


def lora_params(unet):
    """LoRA tensors by their place in the UNet, the adapter's name dropped."""
    found = {}
    for name, p in unet.named_parameters():
        parts = name.split(".")
        for marker in ("lora_A", "lora_B"):
            if marker in parts:
                i = parts.index(marker)
                found[".".join(parts[: i + 1] + parts[i + 2 :])] = p.detach()
    return found


def assert_lora_export_reproduces(pipe, export_dir, trained_unet, unet_output) -> None:
    """``pipe.load_lora_weights(export_dir)`` holds exactly the trained adapter and reproduces the trained UNet."""
    trained = lora_params(trained_unet)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(export_dir))
    loaded = lora_params(pipe.unet)

    assert set(loaded) == set(trained)
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key].float(), rtol=0, atol=0, msg=key)
    # LoRA B starts at zero (an untrained adapter is the identity), so a change means training moved it
    assert max(trained[k].abs().max().item() for k in trained if ".lora_B." in k) > 0
    with_lora = unet_output(pipe.unet)
    assert (with_lora - base).abs().max().item() > 1e-4
    # the exported adapter reproduces the trained policy exactly (same scale, same base weights)
    trained_unet.eval()
    torch.testing.assert_close(with_lora, unet_output(trained_unet), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["final", "checkpoints/checkpoint_00001"])
def test_lora_export_loads_with_load_lora_weights(tmp_path, where):
    """``final/`` and every checkpoint load with load_lora_weights and reproduce the trained policy."""
    _, comps = run_in_process(tmp_path, FAST + ["use_lora=true"])
    final = tmp_path / where
    assert (final / "pytorch_lora_weights.safetensors").is_file()

    trained_unet = comps.pipeline.unet
    trained = lora_params(trained_unet)
    assert trained, "the trained UNet has no LoRA parameters"

    assert_lora_export_reproduces(build_tiny_pipeline(seed=0), final, trained_unet, unet_output)


@pytest.mark.parametrize("where", ["final", "checkpoints/checkpoint_00001"])
def test_full_finetune_export_loads_with_from_pretrained(tmp_path, where):
    _, comps = run_in_process(tmp_path, FAST + ["use_lora=false"])
    unet_dir = tmp_path / where / "unet"
    assert os.path.isdir(unet_dir)
    # a full fine-tuning checkpoint holds the UNet once: its export is exactly the trained tensors
    assert not (tmp_path / where / "trained_weights.safetensors").exists()
    loaded = UNet2DConditionModel.from_pretrained(str(unet_dir))

    trained = dict(comps.pipeline.unet.named_parameters())
    loaded_params = dict(loaded.named_parameters())
    assert set(loaded_params) == set(trained)
    for name, p in loaded_params.items():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0, msg=name)

    base = build_tiny_pipeline(seed=0).unet
    assert (unet_output(loaded) - unet_output(base)).abs().max().item() > 1e-4
