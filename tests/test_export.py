"""scripts/export.py: a run becomes a Hub-ready folder that diffusers loads, with a card of the run's real numbers."""

import shutil
import subprocess
import sys

import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image

from ddpo.models.tiny import build_tiny_pipeline
from tests.conftest import ROOT, TINY, load_script, read_metrics, run_cli
from tests.test_lora_export import unet_output

SCRIPT = ROOT / "scripts" / "export.py"
LORA_FILE = "pytorch_lora_weights.safetensors"


export = load_script("export")


def export_error(*argv) -> str:
    """The one-line message export stops with."""
    with pytest.raises(SystemExit) as stop:
        export.main([str(a) for a in argv])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished tiny LoRA run of two epochs, started as a user starts one (so it has .hydra/)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = run_cli(run_dir, [*TINY, "use_lora=true", "train.learning_rate=1e-2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_the_folder_loads_with_load_lora_weights_and_changes_the_model(lora_run, tmp_path):
    out = tmp_path / "export"
    export.main([str(lora_run), "--out", str(out), "--prompts", "a cat", "--seeds", "2"])

    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_FILE, "reward_curve.png", "samples.png"]
    assert (out / LORA_FILE).read_bytes() == (lora_run / "final" / LORA_FILE).read_bytes()
    pipe = build_tiny_pipeline(seed=0)  # a fresh copy of the run's base model
    before = unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))
    assert (unet_output(pipe.unet) - before).abs().max().item() > 1e-4
    # base and trained rows for one prompt, two seeds
    with Image.open(out / "samples.png") as grid, Image.open(out / "reward_curve.png") as curve:
        assert grid.width > 0 and curve.width > 0


def test_the_card_holds_the_run_numbers_and_hub_metadata(lora_run, tmp_path):
    out = tmp_path / "export"
    export.main([str(lora_run), "--out", str(out), "--no-sample"])
    card = ModelCard.load(out / "README.md")
    records = read_metrics(lora_run)

    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"lora", "text-to-image", "ddpo", "reinforcement-learning"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny model is built locally: no Hub id to name
    text = card.text
    for record in (records[0], records[-1]):
        assert f"| {record['epoch']} | {record['reward_mean']:.4f} | {record['reward_std']:.4f} |" in text
    assert f"2 epochs, {sum(r['num_samples'] for r in records)} samples in total" in text
    assert "`jpeg_compressibility`" in text and "`ddpo`" in text and "| `train.learning_rate` | 0.01 |" in text
    assert "pipe.load_lora_weights(" in text and "from ddpo.models import tiny_model" in text
    assert "python train.py model=tiny" in text
    # --no-sample: the card shows the run's own last logged grid
    assert (out / "samples.png").is_file() and "The last sample batch the run logged" in text


def test_a_checkpoint_exports_its_own_weights_and_epochs(lora_run, tmp_path):
    out = tmp_path / "export"
    export.main([str(lora_run), "--checkpoint", "1", "--out", str(out), "--no-sample"])
    checkpoint = lora_run / "checkpoints" / "checkpoint_00001"
    assert (out / LORA_FILE).read_bytes() == (checkpoint / LORA_FILE).read_bytes()
    assert not (out / "trained_weights.safetensors").exists() and not (out / "optimizer.bin").exists()
    first = read_metrics(lora_run)[0]
    text = (out / "README.md").read_text()
    assert "1 epoch, " in text and f"{first['reward_mean']:.4f}" in text and "checkpoint `checkpoint_00001`" in text
    # a checkpoint directory given directly is the same export
    again = tmp_path / "again"
    export.main([str(checkpoint), "--out", str(again), "--no-sample"])
    assert (again / LORA_FILE).read_bytes() == (out / LORA_FILE).read_bytes()


def test_a_full_fine_tuning_export_loads_with_from_pretrained(lora_run, tmp_path):
    """A run whose final/ holds a whole UNet (use_lora=false) exports that folder, loadable as a subfolder."""
    import torch
    from diffusers import UNet2DConditionModel

    run = tmp_path / "full"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    unet = build_tiny_pipeline(seed=0).unet
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # a "trained" UNet that differs from the base
    unet.save_pretrained(run / "final" / "unet")
    out = tmp_path / "export"
    export.main([str(run), "--out", str(out), "--prompts", "a cat", "--seed-list", "0"])

    loaded = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    torch.testing.assert_close(unet_output(loaded), unet_output(unet), rtol=0, atol=0)
    card = ModelCard.load(out / "README.md")
    assert "lora" not in card.data.tags
    assert 'pipe.unet = UNet2DConditionModel.from_pretrained("export", subfolder="unet")' in card.text


# -- the flow-matching family (pipeline=flow_sde: StableDiffusion3Pipeline) ------------------------
@pytest.fixture(scope="module")
def flow_lora_run(tmp_path_factory):
    """A finished tiny flow-matching LoRA run of two epochs, evaluated with another step count (4) than it trains (3)."""
    from tests.test_flow import FLOW

    run_dir = tmp_path_factory.mktemp("export_flow") / "run"
    overrides = [*FLOW, "use_lora=true", "train.learning_rate=1e-2", "pipeline.eval_num_steps=4"]
    result = run_cli(run_dir, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def run_model(run_dir):
    """The run's own model settings, from its .hydra/config.yaml."""
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / ".hydra" / "config.yaml").model


def test_a_flow_lora_export_loads_into_stable_diffusion_3_and_samples_with_the_ode(
    flow_lora_run, tmp_path, monkeypatch
):
    from diffusers import StableDiffusion3Pipeline

    from ddpo.models.tiny_flow import build_tiny_flow_pipeline
    from tests.test_flow import transformer_output

    calls = []
    original = StableDiffusion3Pipeline.__call__

    def spy(self, *args, **kwargs):  # what the sample grid is drawn with
        calls.append((kwargs.get("num_inference_steps"), type(self.scheduler).__name__))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", spy)
    out = tmp_path / "export"
    export.main([str(flow_lora_run), "--out", str(out), "--prompts", "a cat", "--seeds", "2"])

    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_FILE, "reward_curve.png", "samples.png"]
    assert (out / LORA_FILE).read_bytes() == (flow_lora_run / "final" / LORA_FILE).read_bytes()
    # the evaluation sampler: the SD3 pipeline's own Euler ODE with eval_num_steps, base and trained x 2 seeds
    assert calls == [(4, "FlowMatchEulerDiscreteScheduler")] * 4, calls
    with Image.open(out / "samples.png") as grid:
        assert grid.width > 0

    model = run_model(flow_lora_run)
    pipe = build_tiny_flow_pipeline(seed=model.seed, resolution=model.resolution, with_t5=not model.drop_t5)
    before = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(out))
    assert (transformer_output(pipe.transformer) - before).abs().max().item() > 1e-4

    card = ModelCard.load(out / "README.md")
    assert {"lora", "stable-diffusion-3", "flow-matching"} <= set(card.data.tags)
    assert "stable-diffusion" not in card.data.tags and card.data.base_model is None
    text = card.text
    for record in read_metrics(flow_lora_run):
        assert f"| {record['epoch']} | {record['reward_mean']:.4f} | {record['reward_std']:.4f} |" in text
    assert "StableDiffusion3Pipeline" in text and "DDIMScheduler" not in text and "sample.eta" not in text
    assert "from ddpo.models import tiny_flow_model" in text and 'pipe.load_lora_weights("export")' in text
    assert "num_inference_steps=4, guidance_scale=" in text and "max_sequence_length=8, height=64, width=64" in text
    assert "| `pipeline.eval_num_steps` | 4 |" in text and "pipeline=flow_sde" in text
    assert "the ODE with 4 steps" in text


def test_a_flow_full_fine_tuning_export_holds_the_transformer(flow_lora_run, tmp_path):
    """A flow run whose final/ holds a whole transformer exports transformer/, loadable as a subfolder."""
    import torch
    from diffusers import SD3Transformer2DModel

    from ddpo.models.tiny_flow import build_tiny_flow_pipeline
    from tests.test_flow import transformer_output

    run = tmp_path / "full"
    shutil.copytree(flow_lora_run, run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    transformer = build_tiny_flow_pipeline(seed=0).transformer
    with torch.no_grad():
        transformer.proj_out.bias.add_(0.5)  # a "trained" transformer that differs from the base
    transformer.save_pretrained(run / "final" / "transformer")
    out = tmp_path / "export"
    export.main([str(run), "--out", str(out), "--no-sample"])

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "reward_curve.png", "samples.png", "transformer"]
    loaded = SD3Transformer2DModel.from_pretrained(str(out), subfolder="transformer")
    torch.testing.assert_close(transformer_output(loaded), transformer_output(transformer), rtol=0, atol=0)
    card = ModelCard.load(out / "README.md")
    assert "lora" not in card.data.tags
    text = card.text
    assert 'pipe.transformer = SD3Transformer2DModel.from_pretrained("export", subfolder="transformer")' in text
    assert "# a diffusers StableDiffusion3Pipeline" in text


@pytest.mark.parametrize("drop_t5", [False, True], ids=["t5", "no-t5"])
def test_a_hub_flow_model_card_loads_its_base_with_stable_diffusion_3(drop_t5):
    """The card's snippet names the run's own Hub model and samples as the run evaluates."""
    from tests.conftest import compose

    cfg = compose(["model=sd35_medium", "pipeline=flow_sde", "use_lora=true", f"model.drop_t5={drop_t5}"])
    assert export.pipeline_family(cfg, {"pipeline": "flow_sde"}) == "flow"
    values = export.plain(cfg)
    code = export.usage_code(values, "lora", [LORA_FILE], "", "me/ddpo-sd35", "a cat", "flow")
    lines = code.splitlines()
    assert lines[0] == "from diffusers import StableDiffusion3Pipeline"
    build = 'pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium"'
    assert any(line.startswith(build) for line in lines), code
    assert ("text_encoder_3=None, tokenizer_3=None)" in code) == drop_t5, code
    assert 'pipe.load_lora_weights("me/ddpo-sd35")' in code and "DDIMScheduler" not in code
    steps = values["pipeline"]["eval_num_steps"]
    assert f"image = pipe('a cat', num_inference_steps={steps}, " in code and "height=512, width=512" in code
    compile(code, "card", "exec")  # the snippet is valid Python


def test_push_creates_the_repo_and_uploads_the_folder(lora_run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.append(("create", kw)) or "https://hub/me/tiny")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    out = tmp_path / "export"
    export.main([str(lora_run), "--out", str(out), "--no-sample", "--push", "me/ddpo-tiny", "--private"])

    assert [name for name, _ in calls] == ["create", "upload"]
    assert calls[0][1]["repo_id"] == "me/ddpo-tiny" and calls[0][1]["private"] is True
    assert calls[1][1]["repo_id"] == "me/ddpo-tiny" and calls[1][1]["folder_path"] == str(out)
    assert 'pipe.load_lora_weights("me/ddpo-tiny")' in (out / "README.md").read_text()


def test_a_failed_push_is_one_line_and_keeps_the_folder(lora_run, tmp_path, monkeypatch):
    def refuse(self, **kw):
        raise OSError("401 Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    out = tmp_path / "export"
    message = export_error(lora_run, "--out", out, "--no-sample", "--push", "me/ddpo-tiny")
    assert "401 Unauthorized" in message and "HF_TOKEN" in message
    assert (out / LORA_FILE).is_file()


def test_missing_unfinished_or_busy_runs_are_one_line_errors(lora_run, tmp_path):
    from ddpo.run_lock import RunLock

    assert "no such directory" in export_error(tmp_path / "nope")
    assert "not a run directory of train.py" in export_error(tmp_path)
    assert "no checkpoint of epoch 7" in export_error(lora_run, "--checkpoint", "7")

    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run, unfinished, ignore=shutil.ignore_patterns("final"))
    message = export_error(unfinished)
    assert "has not finished (no final/)" in message and "--checkpoint N" in message and "1, 2" in message

    lock = RunLock(str(unfinished)).acquire()
    try:
        assert "is still training" in export_error(unfinished)
    finally:
        lock.release()

    (unfinished / "metrics.jsonl").unlink()
    assert "holds no epoch" in export_error(unfinished, "--checkpoint", "1")

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--overwrite" in export_error(lora_run, "--out", out, "--no-sample")
    assert (out / "notes.txt").read_text() == "mine"


def test_the_command_line_prints_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such directory" in lines[0], result.stderr


def test_the_card_evaluation_table_starts_with_the_base_models_evaluation(tmp_path):
    """eval.every=2 over 2 epochs: the card's held-out table is eval.jsonl's, before training (epoch 0) and
    after the last epoch; the old card read metrics.jsonl, which never holds the pre-training evaluation."""
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    run_dir = tmp_path / "run"
    overrides = [*TINY, "use_lora=true", "train.learning_rate=1e-2", "eval.every=2", "eval.seeds=1"]
    result = run_cli(run_dir, [*overrides, "eval.batch_size=2", "prompt=from_file", f"prompt.path={prompts}"])
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evaluations] == [0, 2]
    key = "eval_jpeg_compressibility_mean"  # the training reward, under its own name
    base, trained = evaluations[0][key], evaluations[-1][key]
    assert base != trained
    out = tmp_path / "export"
    export.main([str(run_dir), "--out", str(out), "--no-sample"])
    text = ModelCard.load(out / "README.md").text
    assert "| metric | before training | after 2 epochs |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
    assert row.split(" | ")[1].startswith(export.number(base)) and row.split(" | ")[2].startswith(
        export.number(trained)
    )


# -- the card's Hub metadata, versions, command, config and citation ---------------------------------
def front_matter(card_path) -> tuple[dict, str]:
    """The card's YAML front matter, parsed as the Hub parses it, and the Markdown after it."""
    import yaml

    text = card_path.read_text()
    assert text.startswith("---\n"), text[:200]
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_the_card_has_the_hubs_metadata_versions_command_config_and_citation(lora_run, tmp_path):
    import importlib.metadata

    import yaml

    import ddpo

    out = tmp_path / "export"
    export.main([str(lora_run), "--out", str(out), "--no-sample"])
    meta, body = front_matter(out / "README.md")

    assert meta["license"] == "apache-2.0"  # the tiny model is this project's own: no other model's license
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "lora", "text-to-image", "ddpo", "reinforcement-learning"} <= set(meta["tags"])
    assert "base_model" not in meta  # built locally: no Hub id to name
    assert "## Versions" in body and f"| ddpo-diffusion | {ddpo.__version__} |" in body
    for library in ("torch", "diffusers", "transformers", "peft"):
        assert f"| {library} | {importlib.metadata.version(library)} |" in body, library
    overrides = yaml.safe_load((lora_run / ".hydra" / "overrides.yaml").read_text())
    command = " ".join(["python train.py", *(o for o in overrides if not o.startswith("hydra."))])
    assert f"```bash\n{command}\n```" in body
    config = body.split("<summary>", 1)[1].split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(config) == yaml.safe_load((lora_run / ".hydra" / "config.yaml").read_text())
    assert "</details>" in body.split("```yaml", 1)[1]  # collapsed on the Hub
    assert "@software{ddpo_diffusion" in body and f"version = {{{ddpo.__version__}}}" in body
    assert "Training Diffusion Models with Reinforcement Learning" in body and "2305.13301" in body


def shipped_hub_models() -> list[str]:
    """The conf/model presets that name a Hub model."""
    from omegaconf import OmegaConf

    return sorted(
        p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if export.hub_id(OmegaConf.load(p).get("path"))
    )


@pytest.mark.parametrize("name", shipped_hub_models())
def test_every_shipped_hub_model_gives_the_card_its_license(name, tmp_path):
    """license (and license_name / license_link for the "other" ones, as the Hub names them), base_model and
    how the weights relate to it, for each Hub model a preset names; the run is made by hand (no training)."""
    from omegaconf import OmegaConf

    from tests.test_export_safety import make_run

    run = make_run(tmp_path, lora=True)
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    cfg.model = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    OmegaConf.save(cfg, config)
    export.main([str(run), "--out", str(tmp_path / "export"), "--no-sample"])
    meta, body = front_matter(tmp_path / "export" / "README.md")

    hub = cfg.model.path
    expected = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": ("creativeml-openrail-m", None),
        "CompVis/stable-diffusion-v1-4": ("creativeml-openrail-m", None),
        "stabilityai/stable-diffusion-2-1": ("openrail++", None),
        "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", None),
        "stabilityai/stable-diffusion-3.5-medium": ("other", "stabilityai-ai-community"),
        "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license"),
        "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None),
    }[hub]
    assert (meta["license"], meta.get("license_name")) == expected
    assert ("license_link" in meta) == (expected[0] == "other")
    if "license_link" in meta:
        assert meta["license_link"].startswith(f"https://huggingface.co/{hub}/")
    assert meta["base_model"] == hub and meta["base_model_relation"] == "adapter"
    assert f"| base model `{hub}` | `{cfg.model.get('revision') or 'main'}`" in body


def test_the_card_hides_request_headers(tmp_path):
    """reward.headers may carry a token (conf/reward/remote.yaml): the card's command and config hide the values."""
    from omegaconf import OmegaConf

    from tests.test_export_safety import make_run

    secret = "Bearer not-for-the-hub"
    run = make_run(tmp_path, lora=True)
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    cfg.eval.rewards = {
        "remote": {"_target_": "ddpo.rewards.remote.RemoteReward", "headers": {"Authorization": secret}}
    }
    OmegaConf.save(cfg, config)
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- model=tiny\n- '+eval.rewards.remote.headers.Authorization={secret}'\n"
    )
    export.main([str(run), "--out", str(tmp_path / "export"), "--no-sample"])
    text = (tmp_path / "export" / "README.md").read_text()
    assert secret not in text and "not-for-the-hub" not in text
    assert "Authorization: <redacted>" in text and "+eval.rewards.remote.headers.Authorization=<redacted>" in text


def test_the_citation_is_citation_cff():
    """The card cites ddpo.citation (a wheel has no CITATION.cff): it must say what CITATION.cff says."""
    import yaml

    import ddpo
    from ddpo.citation import PAPER, SOFTWARE

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["title"] == SOFTWARE["title"] and cff["license"] == SOFTWARE["license"]
    assert str(cff["version"]) == SOFTWARE["version"] == ddpo.__version__
    assert [a["name"] for a in cff["authors"]] == SOFTWARE["authors"]
    (paper,) = cff["references"]
    assert paper["title"] == PAPER["title"] and paper["year"] == PAPER["year"] and paper["url"] == PAPER["url"]
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == PAPER["authors"]
    assert paper["collection-title"] == PAPER["booktitle"]
    assert paper["identifiers"][0]["value"] == f"arXiv:{PAPER['arxiv']}"
