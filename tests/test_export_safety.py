"""scripts/export.py copies only the weights files it knows, of the run itself, and pushes only what it wrote.

The runs here are made by hand (a config, two metrics lines, a logged grid, final/): export with
--no-sample reads nothing else, so no training is needed.
"""

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import ROOT, TINY, compose
from tests.test_export import LORA_FILE, SCRIPT, export, export_error

SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- not for the Hub"
FULL_EXPORT = {
    "README.md",
    "reward_curve.png",
    "samples.png",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}


def make_run(root, lora: bool = False, overrides=()):
    """A finished tiny run as train.py leaves it: .hydra/config.yaml, metrics.jsonl, images/, final/."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose([*TINY, f"use_lora={str(lora).lower()}", *overrides])
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
    records = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.5, "num_samples": 4} for e in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "images").mkdir()
    Image.new("RGB", (8, 8), "blue").save(run / "images" / "step_000004.png")
    (run / "final").mkdir()
    if lora:
        import torch
        from safetensors.torch import save_file

        save_file({"lora.down.weight": torch.zeros(2, 2)}, str(run / "final" / LORA_FILE))
    else:
        from ddpo.models.tiny import build_tiny_pipeline

        build_tiny_pipeline(seed=0).unet.save_pretrained(run / "final" / "unet")
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("safety"))


def copy_run(run, where):
    import shutil

    shutil.copytree(run, where, symlinks=True)
    return where


def files_of(folder) -> set[str]:
    """Every entry under ``folder`` (links included), relative to it."""
    found = set()
    for directory, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            found.add(os.path.relpath(os.path.join(directory, name), folder))
    return found


def test_planted_files_and_links_out_of_the_run_are_neither_exported_nor_pushed(
    full_run, tmp_path, monkeypatch, capsys
):
    run = copy_run(full_run, tmp_path / "run")
    outside = tmp_path / "home"
    (outside / ".ssh").mkdir(parents=True)
    (outside / ".ssh" / "id_rsa").write_text(SECRET)
    Image.new("RGB", (8, 8), "red").save(outside / "private.png")
    unet = run / "final" / "unet"
    (unet / "id_rsa").write_text(SECRET)  # planted beside the weights
    (unet / "notes.txt").write_text(SECRET)
    os.symlink(outside / ".ssh" / "id_rsa", unet / "key")  # a link out of the run
    os.symlink(outside / ".ssh", unet / "ssh")
    os.symlink(outside / ".ssh", run / "final" / "ssh")
    os.symlink(outside / "private.png", run / "images" / "step_000099.png")  # a newer "logged grid", elsewhere

    uploads = []

    def create_repo(self, **kw):
        (out / "late.txt").write_text(SECRET)  # something that appears in the folder between export and push
        return "https://hub/me/x"

    def upload_folder(self, folder_path, allow_patterns=None, ignore_patterns=None, **kw):
        # what huggingface_hub would upload: the folder's files, filtered by the patterns given
        names = sorted(files_of(folder_path))
        uploads.extend(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "export"
    export.main([str(run), "--out", str(out), "--no-sample", "--push", "me/x"])
    captured = capsys.readouterr()

    assert files_of(out) - {"late.txt"} == FULL_EXPORT
    assert not any(os.path.islink(out / name) for name in files_of(out))
    for name in FULL_EXPORT:
        assert SECRET.encode() not in (out / name).read_bytes(), name
    with Image.open(out / "samples.png") as grid:  # the run's own grid, not the linked one
        assert grid.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert set(uploads) == FULL_EXPORT, uploads  # what export wrote, and nothing that appeared later
    listing = captured.out[captured.out.index("uploading") :].splitlines()
    assert listing[0].startswith(f"uploading {len(FULL_EXPORT)} files") and "me/x" in listing[0]
    assert sorted(line.split()[0] for line in listing[1 : 1 + len(FULL_EXPORT)]) == sorted(FULL_EXPORT)
    assert not any(word in captured.out for word in ("id_rsa", "notes.txt", "unet/key", "ssh", "late.txt"))
    assert "not exported" in captured.err and "unet/id_rsa" in captured.err and "unet/notes.txt" in captured.err


def test_a_final_folder_linked_out_of_the_run_is_refused(full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    os.replace(run / "final", elsewhere)
    (elsewhere / "unet" / "id_rsa").write_text(SECRET)
    os.symlink(elsewhere, run / "final")
    out = tmp_path / "export"
    message = export_error(run, "--out", out, "--no-sample")
    assert "outside the run directory" in message and str(run / "final") in message
    assert not out.exists() and not (tmp_path / "export.partial").exists()


@pytest.mark.parametrize("what", ["weights-file", "unet-folder"])
def test_weights_linked_out_of_the_run_are_refused(full_run, tmp_path, what):
    """Even under the name of a weights file: the link's target is not the run's."""
    run = copy_run(full_run, tmp_path / "run")
    unet = run / "final" / "unet"
    target = tmp_path / "elsewhere"
    if what == "weights-file":
        target.mkdir()
        os.replace(unet / "diffusion_pytorch_model.safetensors", target / "w.safetensors")
        os.symlink(target / "w.safetensors", unet / "diffusion_pytorch_model.safetensors")
    else:
        os.replace(unet, target)
        os.symlink(target, unet)
    out = tmp_path / "export"
    assert "outside the run directory" in export_error(run, "--out", out, "--no-sample")
    assert not out.exists()


def test_a_link_inside_the_run_is_followed(full_run, tmp_path):
    """final/ pointing at a checkpoint's weights of the same run is the run's own file."""
    run = copy_run(full_run, tmp_path / "run")
    (run / "checkpoints").mkdir()
    os.replace(run / "final", run / "checkpoints" / "weights")
    os.symlink(run / "checkpoints" / "weights", run / "final")
    out = tmp_path / "export"
    export.main([str(run), "--out", str(out), "--no-sample"])
    assert files_of(out) == FULL_EXPORT and not os.path.islink(out / "unet")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_file_named_as_weights_that_is_not_is_refused(tmp_path, lora):
    """A secret renamed to the weights' name is refused: a safetensors file starts with its JSON header."""
    run = make_run(tmp_path, lora=lora)
    name = LORA_FILE if lora else "unet/diffusion_pytorch_model.safetensors"
    (run / "final" / name).write_text(SECRET)
    out = tmp_path / "export"
    message = export_error(run, "--out", out, "--no-sample")
    assert "is not a safetensors file" in message and name in message
    assert not out.exists()


def test_a_full_export_holds_the_safetensors_index_and_shards(full_run, tmp_path):
    """What save_pretrained writes for a large model (shards and their index) is on the list."""
    from diffusers import UNet2DConditionModel

    run = copy_run(full_run, tmp_path / "run")
    unet = UNet2DConditionModel.from_pretrained(str(run / "final" / "unet"))
    for entry in (run / "final" / "unet").iterdir():
        entry.unlink()
    unet.save_pretrained(run / "final" / "unet", max_shard_size="1MB")
    written = {f"unet/{p.name}" for p in (run / "final" / "unet").iterdir()}
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in written and len(written) > 3
    out = tmp_path / "export"
    export.main([str(run), "--out", str(out), "--no-sample"])
    assert files_of(out) == written | {"README.md", "reward_curve.png", "samples.png"}
    UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")


# -- --out ------------------------------------------------------------------------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if export gets as far as sampling (it must refuse first)."""

    def sampled(*args, **kwargs):
        raise AssertionError("export sampled before refusing")

    monkeypatch.setattr(export, "sample_grid", sampled)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_out_an_existing_file_is_one_line_before_anything_is_built(full_run, tmp_path, no_sampling, overwrite):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    message = export_error(full_run, "--out", taken, *(["--overwrite"] if overwrite else []))
    assert str(taken) in message and "is a file" in message
    assert taken.read_text() == "mine" and not (tmp_path / "taken.txt.partial").exists()


def test_out_the_run_itself_with_overwrite_is_refused_and_the_run_kept(full_run, tmp_path, no_sampling):
    run = copy_run(full_run, tmp_path / "run")
    for out in (run, tmp_path):
        assert "holds the run directory" in export_error(run, "--out", out, "--overwrite")
    assert "inside the weights" in export_error(run, "--out", run / "final" / "export")
    assert (run / "final" / "unet" / "config.json").is_file() and not (run / "final" / "export").exists()


def test_out_a_link_or_under_a_file_is_one_line(full_run, tmp_path, no_sampling):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    assert "symbolic link" in export_error(full_run, "--out", tmp_path / "link", "--overwrite")
    (tmp_path / "file").write_text("mine")
    assert "is a file, not a folder" in export_error(full_run, "--out", tmp_path / "file" / "sub")
    (tmp_path / "x.partial").write_text("mine")
    assert "in the way" in export_error(full_run, "--out", tmp_path / "x")
    assert (tmp_path / "x.partial").read_text() == "mine" and not any((tmp_path / "elsewhere").iterdir())


# -- sampling arguments, checked before a model is built -----------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seed-list", "-1"], ["--seed-list -1", "2**63"]),
        (["--seed-list", str(2**64)], [str(2**64), "2**63"]),
        (["--seed-list", "0", str(2**63)], [str(2**63)]),
        (["--device", "bogus"], ["--device bogus"]),
        (["--device", "cuda:99"], ["--device cuda:99"]),
    ],
    ids=["negative-seed", "seed-2**64", "seed-2**63", "bogus-device", "missing-cuda"],
)
def test_sampling_arguments_are_one_line_before_the_model_is_built(full_run, tmp_path, no_model, argv, words):
    message = export_error(full_run, "--out", tmp_path / "export", "--prompts", "a cat", *argv)
    for word in words:
        assert word in message, message
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("resolution", [100000, 0, "big"])
def test_a_run_resolution_out_of_range_is_one_line_before_the_model_is_built(tmp_path, no_model, resolution):
    run = make_run(tmp_path)
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    cfg.model.resolution = resolution
    OmegaConf.save(cfg, config)
    message = export_error(run, "--out", tmp_path / "export", "--prompts", "a cat", "--seeds", "1")
    assert "model.resolution" in message and "--no-sample" in message, message


def test_the_command_line_refuses_bad_arguments_in_one_line(tmp_path):
    """argparse's own mistakes too: one error line and exit status 1, not a usage block."""
    for argv in (["run", "--seeds", "abc"], ["run", "--bogus"], []):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_the_command_line_refuses_out_an_existing_file_in_one_line(full_run, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(full_run), "--out", str(taken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a file" in lines[0], result.stderr
    assert taken.read_text() == "mine"
