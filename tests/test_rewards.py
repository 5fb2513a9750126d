"""Rewards: every reward on tiny local models (CPU, offline), the aesthetic head's verification,
PIL vs tensor preprocessing, the weighted mix, and the reward YAML group."""

from __future__ import annotations

import re
import socket
import string
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from ddpo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REWARD_CONF = ROOT / "conf" / "reward"
SHARED_HEAD_DIR = ROOT.parent / "shared" / "assets" / "laion-aesthetic"
HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"
SHARED_HEAD = SHARED_HEAD_DIR / HEAD_NAME
PROMPTS = ["a cat", "a dog riding a bike", "an apple"]
METADATA = [{}, {}, {}]


def _refuse_network(*args, **kwargs):
    raise OSError("network access is disabled in the reward tests")


@pytest.fixture(autouse=True, scope="module")
def reward_no_network():
    """No test here may reach the network: sockets and urlopen fail, the Hub is offline."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", _refuse_network)
        patch.setattr(socket.socket, "connect_ex", _refuse_network)
        patch.setattr(urllib.request, "urlopen", _refuse_network)
        yield


def _require_shared_head():
    if not SHARED_HEAD.is_file():
        pytest.skip(f"../shared/assets/laion-aesthetic not present: no real {HEAD_NAME} to test against")


def _smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish images: low-resolution noise upsampled, values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=generator)
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


def _assert_reward_output(output, batch: int = 3):
    rewards, info = output
    assert isinstance(rewards, torch.Tensor)
    assert rewards.shape == (batch,) and rewards.dtype == torch.float32 and rewards.device.type == "cpu"
    assert torch.isfinite(rewards).all()
    assert not rewards.requires_grad
    assert isinstance(info, dict)
    for key, value in info.items():
        assert value.shape == (batch,) and value.device.type == "cpu", key
        assert not value.requires_grad, key


def _assert_frozen(*modules):
    for module in modules:
        assert not module.training
        assert all(not parameter.requires_grad for parameter in module.parameters())


# ---------------------------------------------------------------- fixtures: tiny local models


@pytest.fixture(scope="module")
def reward_random_head(tmp_path_factory) -> Path:
    """A randomly initialised aesthetic head saved like the real one (a plain state dict)."""
    from rewards.aesthetic_head import AestheticHead

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("head") / "random-head.pth"
    torch.save(AestheticHead().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reward_head(reward_random_head):
    """(path, sha256 or None): the real head when the shared asset is present, else a random head."""
    if SHARED_HEAD.is_file():
        from rewards.aesthetic import HEAD_SHA256

        return SHARED_HEAD, HEAD_SHA256
    return reward_random_head, None


@pytest.fixture(scope="module")
def reward_aesthetic(reward_head):
    from rewards.aesthetic import AestheticReward

    torch.manual_seed(0)
    path, sha256 = reward_head
    return AestheticReward(clip_model="tiny-test", clip_pretrained=None, head_path=str(path), head_sha256=sha256)


@pytest.fixture(scope="module")
def reward_hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel + processor (hand-made character vocabulary), saved offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            **special,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-hf-clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_hps_checkpoint(tmp_path_factory) -> Path:
    """A tiny-test open_clip model saved in the HPS checkpoint format ({"state_dict": ...})."""
    from rewards.open_clip_models import create_open_clip

    torch.manual_seed(0)
    model = create_open_clip("tiny-test", None)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------- JPEG


@pytest.mark.parametrize("class_name", ["JpegCompressibility", "JpegIncompressibility"])
def test_jpeg_rewards_one_finite_value_per_image(class_name):
    import rewards.jpeg

    reward = getattr(rewards.jpeg, class_name)(quality=95)
    assert reward.to("cpu", torch.float16) is reward
    output = reward(_smooth_images(3, 64, 64), PROMPTS, METADATA)
    _assert_reward_output(output)
    rewards, info = output
    assert (info["jpeg_kb"] > 0).all()
    expected = -info["jpeg_kb"] if class_name == "JpegCompressibility" else info["jpeg_kb"]
    assert torch.equal(rewards, expected)


def test_jpeg_flat_image_is_more_compressible_than_noise():
    from rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

    flat = torch.full((1, 3, 128, 128), 0.5)
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    sizes = jpeg_size_kb(images)
    assert sizes[0] < sizes[1]
    compressibility, _ = JpegCompressibility()(images, PROMPTS[:2], METADATA[:2])
    incompressibility, _ = JpegIncompressibility()(images, PROMPTS[:2], METADATA[:2])
    assert compressibility[0] > compressibility[1]
    assert incompressibility[0] < incompressibility[1]


def test_jpeg_size_is_bytes_over_1000_at_quality_95():
    import io

    from PIL import Image

    from rewards.jpeg import jpeg_size_kb

    image = _smooth_images(1, 48, 40, seed=3)
    array = (image[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(image).item() == pytest.approx(len(buffer.getvalue()) / 1000)


def test_rewards_reject_malformed_images():
    from rewards.jpeg import JpegCompressibility

    with pytest.raises(ValueError, match="B, 3, H, W"):
        JpegCompressibility()(torch.rand(3, 64, 64), PROMPTS, METADATA)


# ---------------------------------------------------------------- aesthetic


def test_aesthetic_tiny_model_one_finite_score_per_image(reward_aesthetic):
    _assert_reward_output(reward_aesthetic(_smooth_images(3, 96, 128), PROMPTS, METADATA))
    _assert_frozen(reward_aesthetic.clip, reward_aesthetic.head)


def test_aesthetic_accepts_images_on_any_device_and_dtype(reward_aesthetic):
    images = _smooth_images(3, 64, 64)
    expected, _ = reward_aesthetic(images, PROMPTS, METADATA)
    got, _ = reward_aesthetic(images.double(), PROMPTS, METADATA)
    torch.testing.assert_close(got, expected)


def test_real_head_passes_sha256_and_loads_with_strict_keys():
    _require_shared_head()
    from rewards.aesthetic import HEAD_SHA256, HEAD_SIZE, load_head, resolve_head_path
    from rewards.download import sha256_file

    assert SHARED_HEAD.stat().st_size == HEAD_SIZE
    assert sha256_file(SHARED_HEAD) == HEAD_SHA256
    path = resolve_head_path(SHARED_HEAD)  # default: checks the published sha256
    head = load_head(path)
    state_dict = torch.load(SHARED_HEAD, map_location="cpu", weights_only=True)
    assert (
        set(head.state_dict())
        == set(state_dict)
        == {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    )
    _assert_frozen(head)
    scores = head(torch.nn.functional.normalize(torch.randn(4, 768), dim=-1))
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_corrupted_head_is_refused(tmp_path):
    _require_shared_head()
    from rewards.aesthetic import resolve_head_path

    data = bytearray(SHARED_HEAD.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted = tmp_path / HEAD_NAME
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256") as error:
        resolve_head_path(corrupted)
    assert "\n" not in str(error.value) and "reward.head_path" in str(error.value)


def test_truncated_head_is_refused(tmp_path):
    _require_shared_head()
    from rewards.aesthetic import AestheticReward

    truncated = tmp_path / HEAD_NAME
    truncated.write_bytes(SHARED_HEAD.read_bytes()[:100_000])
    with pytest.raises(ConfigError, match="truncated") as error:
        AestheticReward(clip_model="tiny-test", clip_pretrained=None, head_path=str(truncated))
    assert "\n" not in str(error.value)


def test_corrupted_cached_head_is_refused_not_used(tmp_path, monkeypatch):
    _require_shared_head()
    import rewards.download
    from rewards.aesthetic import resolve_head_path

    cached = tmp_path / HEAD_NAME
    data = bytearray(SHARED_HEAD.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    monkeypatch.setattr(rewards.download, "fetch_url", _refuse_network)
    with pytest.raises(ConfigError, match="cached LAION aesthetic head"):
        resolve_head_path(None, cache_dir=tmp_path)


def test_head_download_is_verified_before_it_enters_the_cache(tmp_path, monkeypatch):
    _require_shared_head()
    import rewards.download
    from rewards.aesthetic import resolve_head_path

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def truncated_download(url, dest, timeout, max_bytes=None):
        calls.append(url)
        Path(dest).write_bytes(SHARED_HEAD.read_bytes()[:1000])

    def hub_copy(repo_id, filename, revision=None, cache_dir=None):
        calls.append(repo_id)
        return str(SHARED_HEAD)

    monkeypatch.setattr(rewards.download, "fetch_url", truncated_download)
    monkeypatch.setattr(rewards.download, "hub_file", hub_copy)
    monkeypatch.setattr(rewards.download, "unreachable", lambda url: None)  # as if the host answered
    path = resolve_head_path(None, cache_dir=tmp_path / "cache")
    assert len(calls) == 2  # the truncated URL download was refused, the Hub copy accepted
    assert path == tmp_path / "cache" / HEAD_NAME
    assert path.read_bytes() == SHARED_HEAD.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [HEAD_NAME]  # no partial files left


def test_aesthetic_offline_without_head_names_the_file_and_key(tmp_path, monkeypatch):
    import rewards.download
    from rewards.aesthetic import AestheticReward

    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise OSError("simulated: no route to host")

    monkeypatch.setattr(rewards.download, "fetch_url", unreachable)
    monkeypatch.setattr(rewards.download, "hub_file", unreachable)
    monkeypatch.setattr(rewards.download, "unreachable", lambda url: None)  # the probe passes; the fetch fails
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        with pytest.raises(ConfigError) as error:
            AestheticReward(clip_model="tiny-test", clip_pretrained=None, cache_dir=str(tmp_path / "empty"))
        message = str(error.value)
        assert "\n" not in message
        assert HEAD_NAME in message and "reward.head_path=" in message
    assert len(attempts) == 3  # offline: the Hub cache only; online: URL then Hub
    assert not any((tmp_path / "empty").iterdir())


def test_missing_head_path_is_a_config_error(tmp_path):
    from rewards.aesthetic import AestheticReward

    with pytest.raises(ConfigError, match="reward.head_path"):
        AestheticReward(clip_model="tiny-test", clip_pretrained=None, head_path=str(tmp_path / "nope.pth"))


def test_missing_clip_checkpoint_is_a_config_error(reward_random_head, tmp_path):
    from rewards.aesthetic import AestheticReward

    with pytest.raises(ConfigError, match="reward.clip_pretrained"):
        AestheticReward(
            clip_model="tiny-test",
            clip_pretrained=str(tmp_path / "clip.bin"),
            head_path=str(reward_random_head),
            head_sha256=None,
        )


def test_pil_and_tensor_preprocessing_agree(reward_aesthetic):
    for height, width in [(256, 320), (512, 512), (200, 150)]:
        images = _smooth_images(3, height, width, seed=height)
        pil = reward_aesthetic.pixels(images, "pil")
        tensor = reward_aesthetic.pixels(images, "tensor")
        assert pil.shape == tensor.shape == (3, 3, 224, 224)
        assert (pil - tensor).abs().max() < 0.05, (height, width)
        with torch.no_grad():
            scores_pil = reward_aesthetic._score_pixels(pil)
            scores_tensor = reward_aesthetic._score_pixels(tensor)
        assert (scores_pil - scores_tensor).abs().max() < 0.09, (height, width)


def test_longest_side_preprocessing_pads_like_pil():
    from rewards.clip_preprocess import preprocess_pil, preprocess_tensor

    images = _smooth_images(2, 300, 200, seed=5)
    pil = preprocess_pil(images, 224, "longest")
    tensor = preprocess_tensor(images, 224, "longest")
    assert pil.shape == tensor.shape == (2, 3, 224, 224)
    assert (pil - tensor).abs().max() < 0.05


def test_gradients_flow_through_the_tensor_path(reward_aesthetic):
    images = _smooth_images(2, 128, 128).requires_grad_(True)
    scores = reward_aesthetic.score_with_grad(images, PROMPTS[:2], METADATA[:2])
    assert scores.shape == (2,) and scores.requires_grad
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in reward_aesthetic.clip.parameters())


def test_aesthetic_to_moves_and_casts(reward_head):
    from rewards.aesthetic import AestheticReward

    path, sha256 = reward_head
    reward = AestheticReward(clip_model="tiny-test", clip_pretrained=None, head_path=str(path), head_sha256=sha256)
    images = _smooth_images(3, 64, 64)
    expected, _ = reward(images, PROMPTS, METADATA)
    assert reward.to("cpu", torch.bfloat16) is reward
    assert next(reward.clip.parameters()).dtype == torch.bfloat16
    got, _ = reward(images, PROMPTS, METADATA)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.5


# ---------------------------------------------------------------- PickScore, CLIP score, HPS v2


def test_pickscore_tiny_model(reward_hf_clip_dir):
    from rewards.pickscore import PickScore

    reward = PickScore(model_path=str(reward_hf_clip_dir), processor_path=str(reward_hf_clip_dir))
    output = reward(_smooth_images(3, 64, 48), PROMPTS, METADATA)
    _assert_reward_output(output)
    _assert_frozen(reward.model)
    rewards, info = output
    torch.testing.assert_close(rewards, reward.model.logit_scale.exp().item() * info["cosine"])


def test_clip_score_tiny_model(reward_hf_clip_dir):
    from rewards.clip_score import ClipScore

    reward = ClipScore(model_path=str(reward_hf_clip_dir), scale=100.0)
    output = reward(_smooth_images(3, 64, 48), PROMPTS, METADATA)
    _assert_reward_output(output)
    _assert_frozen(reward.model)
    rewards, info = output
    torch.testing.assert_close(rewards, 100.0 * info["cosine"])
    assert (info["cosine"].abs() <= 1.0 + 1e-5).all()
    different_prompts, _ = reward(_smooth_images(3, 64, 48), ["zzz", "0", "?"], METADATA)
    assert not torch.equal(different_prompts, rewards)


def test_hub_model_unavailable_offline_is_a_config_error():
    from rewards.pickscore import PickScore

    with pytest.raises(ConfigError, match="reward.processor_path") as error:
        PickScore(processor_path="nobody/no-such-clip-processor", processor_revision="main")
    assert "\n" not in str(error.value)


def test_hpsv2_tiny_model(reward_hps_checkpoint):
    from rewards.hpsv2 import HPSv2

    reward = HPSv2(clip_model="tiny-test", checkpoint_path=str(reward_hps_checkpoint))
    output = reward(_smooth_images(3, 96, 64), PROMPTS, METADATA)
    _assert_reward_output(output)
    _assert_frozen(reward.model)
    assert (output[0].abs() <= 1.0 + 1e-5).all()  # a cosine similarity


def test_hpsv2_checkpoint_problems_are_config_errors(tmp_path, monkeypatch):
    import rewards.download
    from rewards.hpsv2 import HPSv2

    incomplete = tmp_path / "incomplete.pt"
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, incomplete)
    with pytest.raises(ConfigError, match="lacks"):
        HPSv2(clip_model="tiny-test", checkpoint_path=str(incomplete))
    with pytest.raises(ConfigError, match="reward.checkpoint_path"):
        HPSv2(clip_model="tiny-test", checkpoint_path=str(tmp_path / "missing.pt"))
    monkeypatch.setattr(rewards.download, "hub_file", _refuse_network)
    with pytest.raises(ConfigError, match="HPS_v2.1_compressed.pt") as error:
        HPSv2(clip_model="tiny-test")
    assert "reward.checkpoint_path" in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- mix


class _RecordingReward:
    """A fake component: constant rewards, records to() calls."""

    def __init__(self, value: float):
        self.value = value
        self.moved_to = []

    def to(self, device, dtype=None):
        self.moved_to.append((device, dtype))
        return self

    def __call__(self, images, prompts, metadata):
        values = torch.full((images.shape[0],), self.value)
        return values, {"twice": 2 * values}


def test_mix_is_the_weighted_sum_and_logs_every_component():
    from rewards.jpeg import JpegCompressibility, JpegIncompressibility
    from rewards.mix import WeightedSum

    fake = _RecordingReward(3.0)
    mix = WeightedSum(
        {
            "small": {"weight": 1.0, "reward": JpegCompressibility()},
            "big": {"weight": 0.5, "reward": JpegIncompressibility()},
            "constant": {"weight": -2.0, "reward": fake},
        }
    )
    assert mix.to("cpu", torch.bfloat16) is mix
    assert fake.moved_to == [("cpu", torch.bfloat16)]
    images = _smooth_images(3, 64, 64)
    output = mix(images, PROMPTS, METADATA)
    _assert_reward_output(output)
    total, info = output
    small, _ = JpegCompressibility()(images, PROMPTS, METADATA)
    big, _ = JpegIncompressibility()(images, PROMPTS, METADATA)
    torch.testing.assert_close(total, 1.0 * small + 0.5 * big - 2.0 * 3.0)
    torch.testing.assert_close(info["small"], small)
    torch.testing.assert_close(info["big"], big)
    torch.testing.assert_close(info["constant"], torch.full((3,), 3.0))
    assert set(info) == {"small", "big", "constant", "small.jpeg_kb", "big.jpeg_kb", "constant.twice"}


def test_mix_rejects_malformed_components():
    from rewards.mix import WeightedSum

    with pytest.raises(ConfigError):
        WeightedSum({})
    with pytest.raises(ConfigError, match="weight"):
        WeightedSum({"a": {"reward": _RecordingReward(1.0)}})
    with pytest.raises(ConfigError, match="number"):
        WeightedSum({"a": {"weight": "heavy", "reward": _RecordingReward(1.0)}})


# ---------------------------------------------------------------- differentiable scoring (DRaFT, AlignProp)

SHAPE_PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square"]


@pytest.fixture(scope="module")
def reward_pickscore(reward_hf_clip_dir):
    from rewards.pickscore import PickScore

    return PickScore(model_path=str(reward_hf_clip_dir), processor_path=str(reward_hf_clip_dir))


@pytest.fixture(scope="module")
def reward_clip_score(reward_hf_clip_dir):
    from rewards.clip_score import ClipScore

    return ClipScore(model_path=str(reward_hf_clip_dir), scale=100.0)


@pytest.fixture(scope="module")
def reward_hpsv2(reward_hps_checkpoint):
    from rewards.hpsv2 import HPSv2

    return HPSv2(clip_model="tiny-test", checkpoint_path=str(reward_hps_checkpoint))


@pytest.fixture(scope="module")
def reward_shape_proxy():
    from rewards.shapes import ShapeProxy, default_scorer_dir

    return ShapeProxy(str(default_scorer_dir()))


@pytest.fixture(scope="module")
def reward_grad_mix(reward_clip_score, reward_hpsv2):
    from rewards.mix import WeightedSum

    return WeightedSum(
        {"clip": {"weight": 0.5, "reward": reward_clip_score}, "hps": {"weight": 2.0, "reward": reward_hpsv2}}
    )


def _shape_scorer_size() -> int:
    import json

    from rewards.shapes import SCORER_CONFIG, default_scorer_dir

    return int(json.loads((default_scorer_dir() / SCORER_CONFIG).read_text())["size"])


def _frozen_modules(reward):
    """The torch modules whose parameters must get no gradient."""
    from rewards.mix import WeightedSum

    if isinstance(reward, WeightedSum):
        return [module for component in reward.rewards.values() for module in _frozen_modules(component)]
    if hasattr(reward, "head"):
        return [reward.clip, reward.head]
    return [reward.model]


# fixture -> (image sizes, prompts, tolerance on |score_with_grad - __call__|). Measured worst gaps over
# 12 seeds of smooth images at 64x64, 64x48, 65x47, 96x128 and 256x320, each tolerance ~3x that:
# aesthetic (real head, tiny CLIP) 1.4e-3 on its 1-10 scale; the tiny HF CLIP 8.7e-4 in cosine, i.e.
# 0.087 for clip_score (x100) and 0.0124 for PickScore (x logit_scale.exp() = 14.3); HPS v2 7.7e-5;
# the mix (0.5 clip_score + 2 hpsv2) 0.044; the shape proxy 0 (no preprocessing). The gap is the
# PIL/uint8 round trip of ``__call__`` (about one 1/255 step per pixel) against the float torch twin.
GRAD_CASES = {
    "reward_aesthetic": ([(64, 64), (96, 128)], PROMPTS, 5e-3),
    "reward_pickscore": ([(64, 64), (64, 48)], PROMPTS, 0.04),
    "reward_clip_score": ([(64, 64), (64, 48)], PROMPTS, 0.3),
    "reward_hpsv2": ([(64, 64), (96, 64)], PROMPTS, 3e-4),
    "reward_shape_proxy": ([(32, 32)], SHAPE_PROMPTS, 1e-6),
    "reward_grad_mix": ([(64, 64), (64, 48)], PROMPTS, 0.15),
}


@pytest.mark.parametrize("fixture", list(GRAD_CASES), ids=lambda name: name.removeprefix("reward_"))
def test_score_with_grad_matches_call_and_reaches_only_the_images(fixture, request):
    reward = request.getfixturevalue(fixture)
    sizes, prompts, tolerance = GRAD_CASES[fixture]
    assert reward.differentiable is True
    if fixture == "reward_shape_proxy":
        assert sizes == [(_shape_scorer_size(),) * 2]
    modules = _frozen_modules(reward)
    for seed, (height, width) in enumerate(sizes):
        images = _smooth_images(3, height, width, seed=seed)
        expected, _ = reward(images, prompts, METADATA)
        leaf = images.clone().requires_grad_(True)
        scores = reward.score_with_grad(leaf, prompts, METADATA)
        assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.requires_grad
        assert scores.device.type == "cpu"
        gap = (scores.detach() - expected).abs().max().item()
        assert gap < tolerance, (height, width, gap)
        scores.sum().backward()
        assert leaf.grad is not None and leaf.grad.shape == images.shape
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
        for module in modules:
            assert all(parameter.grad is None for parameter in module.parameters())
            _assert_frozen(module)


def test_shape_proxy_grad_path_on_renders_of_the_shipped_scorer(reward_shape_proxy):
    import random

    import numpy as np

    from ddpo import shapes

    rng = random.Random(3)
    scenes = rng.sample(shapes.all_scenes(), 8)
    size = _shape_scorer_size()
    renders = np.stack([shapes.render_scene(scene, rng, size) for scene in scenes])
    images = (torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    captions = [scene.caption for scene in scenes]
    expected, info = reward_shape_proxy(images, captions, [{}] * 8)
    scores = reward_shape_proxy.score_with_grad(images, captions, [{}] * 8)
    torch.testing.assert_close(scores.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores.detach(), torch.sigmoid(info["proxy_logit"]), rtol=0, atol=1e-6)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        reward_shape_proxy.score_with_grad(_smooth_images(8, 2 * size, 2 * size), captions, [{}] * 8)


def test_score_with_grad_accepts_images_on_another_dtype_and_keeps_the_graph(reward_hpsv2):
    base = _smooth_images(2, 64, 64).double().requires_grad_(True)
    images = base * 1.0  # a non-leaf, as a decoded sample is
    scores = reward_hpsv2.score_with_grad(images, PROMPTS[:2], METADATA[:2])
    scores.sum().backward()
    assert base.grad is not None and base.grad.dtype == torch.float64 and base.grad.abs().sum() > 0


def test_non_differentiable_rewards_say_so(reward_clip_score, reward_hpsv2):
    from rewards.base import Reward
    from rewards.jpeg import JpegCompressibility, JpegIncompressibility
    from rewards.mix import WeightedSum
    from rewards.remote import RemoteReward
    from rewards.shapes import ShapeAlignment

    assert Reward.differentiable is False
    assert RemoteReward.differentiable is False
    jpeg_mix = WeightedSum(
        {"clip": {"weight": 1.0, "reward": reward_clip_score}, "jpeg": {"weight": 0.1, "reward": JpegCompressibility()}}
    )
    images = _smooth_images(3, 64, 64)
    for reward in (JpegCompressibility(), JpegIncompressibility(), ShapeAlignment(), jpeg_mix):
        assert reward.differentiable is False
    for reward in (JpegCompressibility(), ShapeAlignment()):
        with pytest.raises(NotImplementedError, match=reward.name):
            reward.score_with_grad(images, PROMPTS, METADATA)
    with pytest.raises(NotImplementedError, match="jpeg"):
        jpeg_mix.score_with_grad(images, PROMPTS, METADATA)
    with pytest.raises(NotImplementedError, match="RemoteReward"):
        RemoteReward.__new__(RemoteReward).score_with_grad(images, PROMPTS, METADATA)
    both = WeightedSum(
        {"clip": {"weight": 1.0, "reward": reward_clip_score}, "hps": {"weight": 1.0, "reward": reward_hpsv2}}
    )
    assert both.differentiable is True


def test_differentiable_flag_of_every_reward_class():
    from rewards.aesthetic import AestheticReward
    from rewards.base import Reward
    from rewards.clip_score import ClipScore
    from rewards.hpsv2 import HPSv2
    from rewards.jpeg import JpegCompressibility, JpegIncompressibility
    from rewards.pickscore import PickScore
    from rewards.remote import RemoteReward
    from rewards.shapes import ShapeAlignment, ShapeProxy

    for cls in (AestheticReward, ClipScore, HPSv2, PickScore, ShapeProxy):
        assert cls.differentiable is True, cls.__name__
        assert cls.score_with_grad is not Reward.score_with_grad, cls.__name__
    for cls in (JpegCompressibility, JpegIncompressibility, RemoteReward, ShapeAlignment):
        assert cls.differentiable is False, cls.__name__


def test_hf_tensor_preprocessing_mirrors_the_processor(reward_clip_score):
    """The tensor path is the model's own image processor on the float images: its PIL path's pixels
    to within the uint8 rounding of the input and of the resized image, with gradients."""
    assert reward_clip_score.differentiable
    for height, width in [(64, 48), (65, 47), (32, 32), (80, 200)]:
        images = _smooth_images(2, height, width, seed=height + width).requires_grad_(True)
        pil = reward_clip_score.pil_pixels(images.detach())
        tensor = reward_clip_score.tensor_pixels(images)
        assert pil.shape == tensor.shape == (2, 3, 32, 32) and tensor.dtype == torch.float32
        # the processor rounds its input and its resized image to uint8: at most ~1.5/255 in pixel space
        assert (pil - tensor.detach()).abs().max() * 0.27 < 1.5 / 255, (height, width)
        tensor.sum().backward()
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0, (height, width)


# ---------------------------------------------------------------- the reward config group


def _compose_reward(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(overrides=[f"+reward={name}", *overrides]).reward


def _instantiate(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg)


def test_every_reward_option_has_a_yaml():
    names = {path.stem for path in REWARD_CONF.glob("*.yaml")}
    assert {
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "aesthetic",
        "pickscore",
        "hpsv2",
        "clip_score",
        "mix",
    } <= names


@pytest.mark.parametrize("path", sorted(REWARD_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_top_level_yaml_key_is_commented(path):
    for line in path.read_text().splitlines():
        match = re.match(r"^(\w+):", line)
        if match and match.group(1) != "_target_":
            assert "#" in line, f"{path.name}: key {match.group(1)!r} has no comment"


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility", "mix"])
def test_offline_reward_configs_instantiate(name):
    reward = _instantiate(_compose_reward(name))
    assert reward.to("cpu", None) is reward
    _assert_reward_output(reward(_smooth_images(3, 64, 64), PROMPTS, METADATA))


def test_mix_config_accepts_a_component_from_the_command_line():
    cfg = _compose_reward(
        "mix", "+reward.components.detail={weight: 0.5, reward: {_target_: rewards.jpeg.JpegIncompressibility}}"
    )
    reward = _instantiate(cfg)
    total, info = reward(_smooth_images(3, 64, 64), PROMPTS, METADATA)
    torch.testing.assert_close(total, info["compressibility"] + 0.5 * info["detail"])


def test_model_reward_configs_instantiate_with_tiny_models(
    reward_random_head, reward_hf_clip_dir, reward_hps_checkpoint
):
    overrides = {
        "aesthetic": [
            "reward.clip_model=tiny-test",
            "reward.clip_pretrained=null",
            f"reward.head_path='{reward_random_head}'",
            "reward.head_sha256=null",
        ],
        "pickscore": [f"reward.model_path='{reward_hf_clip_dir}'", f"reward.processor_path='{reward_hf_clip_dir}'"],
        "clip_score": [f"reward.model_path='{reward_hf_clip_dir}'"],
        "hpsv2": ["reward.clip_model=tiny-test", f"reward.checkpoint_path='{reward_hps_checkpoint}'"],
    }
    for name, extra in overrides.items():
        reward = _instantiate(_compose_reward(name, *extra))
        assert reward.name == name
        _assert_reward_output(reward(_smooth_images(3, 64, 64), PROMPTS, METADATA))


def test_importing_rewards_imports_no_model_library():
    code = (
        "import sys, rewards, rewards.jpeg, rewards.aesthetic, rewards.pickscore, rewards.hpsv2, "
        "rewards.clip_score, rewards.mix\n"
        "print(sorted(m for m in ('open_clip', 'transformers', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_reward_models_score_in_fp32_whatever_the_mixed_precision(tmp_path, reward_random_head):
    """The run's mixed precision casts the diffusion model, not the reward: bf16 runs score like fp32 runs."""
    from ddpo.config import build
    from tests.conftest import TINY, compose

    images = _smooth_images(3, 64, 64)
    scores = {}
    for precision in ("no", "bf16"):
        cfg = compose(
            [
                *TINY,
                f"mixed_precision={precision}",
                "reward=aesthetic",
                "reward.clip_model=tiny-test",
                "reward.clip_pretrained=null",
                f"reward.head_path='{reward_random_head}'",
                "reward.head_sha256=null",
            ]
        )
        torch.manual_seed(0)  # the tiny CLIP's random weights
        _, components = build(cfg, str(tmp_path / precision))
        assert components.reward_fn.dtype == torch.float32
        scores[precision] = components.reward_fn(images, PROMPTS, METADATA)[0]
    torch.testing.assert_close(scores["bf16"], scores["no"], rtol=0, atol=0)

    # a reward can still be asked to score in bf16 (reward.dtype)
    cfg = _compose_reward(
        "aesthetic",
        "reward.clip_model=tiny-test",
        "reward.clip_pretrained=null",
        f"reward.head_path='{reward_random_head}'",
        "reward.head_sha256=null",
        "reward.dtype=bf16",
    )
    reward = _instantiate(cfg).to("cpu")
    assert reward.dtype == torch.bfloat16 and next(reward.clip.parameters()).dtype == torch.bfloat16
