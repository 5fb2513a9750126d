"""The wheel: every package, config and asset an installed copy needs, and ddpo-train = python train.py."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import ddpo
from tests.conftest import ROOT

SOURCES = ["ddpo", "rewards", "conf", "hydra_plugins", "pyproject.toml", "setup.py", "README.md", "LICENSE"]


# the console scripts: train.py and each file of scripts/ that a clone runs (the others are the clone's own)
COMMANDS = {
    "ddpo-train": "ddpo.cli:train",
    "ddpo-sample": "ddpo.tools.sample:main",
    "ddpo-evaluate": "ddpo.tools.evaluate:main",
    "ddpo-export": "ddpo.tools.export:cli",
    "ddpo-plot": "ddpo.tools.plot_runs:main",
    "ddpo-reward-server": "ddpo.tools.reward_server:main",
}


def repo_files(folder: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern) if p.is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the source tree (the build writes build/ and *.egg-info into its source)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    # a researcher's own cluster settings (git-ignored) must stay out of the wheel
    (src / "conf" / "local").mkdir(exist_ok=True)
    (src / "conf" / "local" / "slurm.yaml").write_text("hydra: {launcher: {account: secret}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (found,) = (root / "dist").glob(f"ddpo_diffusion-{ddpo.__version__}-*.whl")
    return found


def test_the_wheel_holds_packages_configs_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    packages = [p.parent for p in ROOT.glob("ddpo/**/__init__.py")]
    for package in packages:
        for module in package.glob("*.py"):
            assert str(module.relative_to(ROOT)) in names, module
    # the repository's rewards/ is installed inside ddpo: no top-level package of that name
    for module in (ROOT / "rewards").glob("*.py"):
        assert f"ddpo/rewards/{module.name}" in names, module
    assert not [n for n in names if n.startswith("rewards/")]
    assert "ddpo/cli.py" in names
    assert "hydra_plugins/ddpo_launcher/launcher.py" in names
    assert "hydra_plugins/__init__.py" not in names  # Hydra's namespace package, shared with other plugins
    assert not [n for n in names if n.endswith(".pyc") or "/build/" in n]

    configs = repo_files("conf", "**/*.yaml")
    assert "conf/config.yaml" in configs and "conf/model/tiny.yaml" in configs
    for config in configs:
        if not config.startswith("conf/local/"):
            assert f"ddpo/{config}" in names, config
    assert not [n for n in names if n.startswith("ddpo/conf/local/")]

    assets = repo_files("ddpo/assets", "**/*")
    assert "ddpo/assets/tiny_shapes/unet/diffusion_pytorch_model.safetensors" in assets
    assert "ddpo/assets/simple_animals.txt" in assets and "ddpo/assets/sd15/unet.json" in assets
    for asset in assets:
        if "__pycache__" not in asset:
            assert asset in names, asset


def test_the_wheel_metadata_matches_the_tested_pins(wheel):
    archive = zipfile.ZipFile(wheel)
    info = f"ddpo_diffusion-{ddpo.__version__}.dist-info"
    assert "ddpo/py.typed" in archive.namelist()
    entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points
    for command, target in COMMANDS.items():
        assert f"{command} = {target}" in entry_points, command
    assert f"{info}/licenses/LICENSE" in archive.namelist()

    metadata = archive.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.11" in metadata
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = {r.name.lower().replace("_", "-"): r for r in requires if r.marker is None}
    extras = {r.name.lower().replace("_", "-") for r in requires if r.marker is not None}
    assert "pytest" not in runtime and {"wandb", "pytest", "ruff", "pre-commit"} <= extras

    # every pinned requirement is declared, and the pinned versions satisfy the declared bounds
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pinned = Requirement(line)
        name = pinned.name.lower().replace("_", "-")
        if name in ("pytest", "ruff", "setuptools", "wandb"):
            assert name in extras, name
            continue
        assert name in runtime, f"{name} is in requirements.txt but not in pyproject's dependencies"
        versions = [s.version for s in pinned.specifier if s.operator == "=="]
        for version in versions:
            assert runtime[name].specifier.contains(version), f"{name}=={version} outside {runtime[name].specifier}"


def installed_copy(wheel: Path, root: Path) -> dict:
    """The wheel unpacked into a directory of its own, and an environment that imports only that copy."""
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}


DDPO_TRAIN = "import sys; from ddpo.cli import train; sys.argv[0] = 'ddpo-train'; train()"  # the console script


def output(command: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ddpo_train_from_an_installed_copy_is_train_py(wheel, tmp_path):
    env = installed_copy(wheel, tmp_path)
    site = tmp_path / "site"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ddpo_train = [sys.executable, "-c", DDPO_TRAIN]
    job = ["experiment=tiny_compressibility", "num_epochs=1", "logger=none", "--cfg", "job"]

    assert output([*ddpo_train, *job], elsewhere, env) == output(
        [sys.executable, str(ROOT / "train.py"), *job], ROOT, env
    )
    where = output(
        [sys.executable, "-c", "import ddpo, ddpo.rewards.jpeg, hydra_plugins.ddpo_launcher"], elsewhere, env
    )
    imported = output([sys.executable, "-c", "import ddpo; print(ddpo.__file__)"], elsewhere, env)
    assert where == "" and imported.startswith(str(site / "ddpo")), imported
    assert str(site / "ddpo" / "conf") in output([*ddpo_train, "--info", "searchpath"], elsewhere, env)
    assert "SlottedLocalLauncher" in output([*ddpo_train, "--info", "plugins"], elsewhere, env)  # launcher=local
    assert "name: train" in output([*ddpo_train, "--cfg", "hydra"], elsewhere, env)  # the run's log is train.log


def test_ddpo_train_trains_from_an_installed_copy(wheel, tmp_path):
    """The quick start's preset, one epoch, run from the installed copy in another directory."""
    env = installed_copy(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", DDPO_TRAIN, "experiment=tiny_compressibility", "num_epochs=1", "logger=none"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (elsewhere / "outputs").glob("*/*")  # outputs in the current directory, as with train.py
    assert (run_dir / "final" / "unet").is_dir() and (run_dir / "train.log").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_logger_wandb_without_the_extra_is_one_line(tmp_path, monkeypatch):
    """wandb is the optional [wandb] extra: without it, logger=wandb stops before anything is built."""
    import importlib.util

    from ddpo.config import build
    from ddpo.errors import ConfigError
    from tests.conftest import TINY, compose

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(
        ConfigError, match=r"logger=wandb needs the wandb package: pip install 'ddpo-diffusion\[wandb\]'"
    ):
        build(compose([*TINY, "logger=wandb"]), str(tmp_path / "run"))


def test_an_installed_copy_lives_beside_another_top_level_rewards_package(wheel, tmp_path):
    """PyPI's ``rewards`` (0.1.1) is a top-level package too: the wheel must not install one, or installing both
    overwrites files. Here a stand-in ``rewards`` sits in the same site directory; both import, each its own."""
    env = installed_copy(wheel, tmp_path)
    site = tmp_path / "site"
    assert not (site / "rewards").exists()  # the wheel installed no top-level rewards/
    (site / "rewards").mkdir()
    (site / "rewards" / "__init__.py").write_text('WHOSE = "the other rewards package"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import rewards, ddpo.rewards.jpeg as jpeg; from hydra.utils import get_class; "
        "print(rewards.WHOSE); print(jpeg.__file__); "
        "print(get_class('ddpo.rewards.jpeg.JpegCompressibility').__name__)"
    )
    whose, jpeg_file, target = output([sys.executable, "-c", probe], elsewhere, env).splitlines()
    assert whose == "the other rewards package"
    assert jpeg_file.startswith(str(site / "ddpo" / "rewards")) and target == "JpegCompressibility"


def test_the_tools_run_from_an_installed_copy(wheel, tmp_path):
    """Every ddpo-* command of the wheel is installed and runs its module; evaluate composes a base model's
    config from the configs shipped in the package, as it does from conf/ in a clone."""
    env = installed_copy(wheel, tmp_path)
    site = tmp_path / "site"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib.metadata as m; "
        "eps = {e.name: e for e in m.entry_points(group='console_scripts') if e.name.startswith('ddpo-')}; "
        "print(sorted(eps)); [e.load() for e in eps.values()]; "
        "print(m.entry_points(group='console_scripts', name='ddpo-sample')[0].load().__module__)"
    )
    names, module = output([sys.executable, "-c", probe], elsewhere, env).splitlines()
    assert names == str(sorted(COMMANDS)) and module == "ddpo.tools.sample"
    for command in COMMANDS:
        if command != "ddpo-train":  # (its --help is test_ddpo_train_from_an_installed_copy_is_train_py's)
            assert (site / "bin" / command).is_file(), command
            help_text = output([str(site / "bin" / command), "--help"], elsewhere, env)
            assert help_text.startswith(f"usage: {command} "), help_text[:300]
    compose = (
        "from ddpo.tools.evaluate import compose; cfg, reward = compose(['experiment=tiny_shapes_alignment']); "
        "print(reward, cfg.model._target_)"
    )
    assert output([sys.executable, "-c", compose], elsewhere, env).split() == [
        "shape_alignment",
        "ddpo.models.tiny_shapes_model",
    ]
    seeds = subprocess.run(
        [str(site / "bin" / "ddpo-sample"), "run", "--seeds", "0", "1"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert seeds.returncode == 1 and seeds.stderr.strip().endswith("--seed-list 0 1"), seeds.stderr
