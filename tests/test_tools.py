"""The command-line tools (ddpo/tools, run by scripts/*.py and the ddpo-* commands): their options agree.

``--seeds N`` is a number of seeds (0 .. N-1) in sample, export and evaluate, as ``eval.seeds`` is in
the config; ``--seed-list`` gives seed values; the old list form of ``--seeds`` is one line naming
``--seed-list``. Without ``--prompts``, sample draws its prompts from the run's own prompt set, as export
does. Nothing here builds a model: the functions that would are replaced by recorders.
"""

import subprocess
import sys

import pytest
from PIL import Image

from ddpo.tools import evaluate as evaluate_tool
from ddpo.tools import export as export_tool
from ddpo.tools import sample as sample_tool
from tests.conftest import ROOT
from tests.test_export_safety import make_run

SHAPES = ["prompt=shapes_train"]  # captions ("a red circle ...") that no fixed default list holds


class FakePipe:
    """What sample.main does with a pipeline before it samples (no model behind it)."""

    def __init__(self):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler()

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("tools"), lora=True, overrides=SHAPES)


@pytest.fixture
def drawn(monkeypatch):
    """sample.main with no model: records (prompts, seeds) of each sampled row set."""
    calls = []
    plan_base = sample_tool.plan_base

    def planned(run_dir, model_path):
        cfg, _ = plan_base(run_dir, model_path)  # the run's config, checked as before
        return cfg, FakePipe

    def rows(pipe, prompts, seeds, cfg, device):
        calls.append((list(prompts), list(seeds)))
        return [[Image.new("RGB", (8, 8)) for _ in seeds] for _ in prompts]

    monkeypatch.setattr(sample_tool, "plan_base", planned)
    monkeypatch.setattr(sample_tool, "sample_rows", rows)
    monkeypatch.setattr(sample_tool, "apply_trained", lambda pipe, weights_dir: "LoRA")
    return calls


def one_line(call, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        call([str(a) for a in argv])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_sample_draws_the_runs_own_prompts_and_counts_seeds(shapes_run, tmp_path, drawn, capsys):
    out = tmp_path / "grid.png"
    sample_tool.main([str(shapes_run), "--device", "cpu", "--out", str(out)])
    (prompts, seeds), *_ = drawn
    from ddpo.prompts import ShapesPrompts

    captions = {c for kind in ShapesPrompts(split="train").by_kind.values() for c in kind}
    assert len(prompts) == 3 and set(prompts) <= captions, prompts  # not "a cat", "a dog", "a horse"
    assert seeds == [0, 1, 2, 3] and out.is_file()

    drawn.clear()
    sample_tool.main([str(shapes_run), "--device", "cpu", "--out", str(out), "--seeds", "2"])
    assert [seeds for _, seeds in drawn] == [[0, 1]]  # a number of seeds, as evaluate's --seeds
    note = capsys.readouterr().err
    assert "--seeds 2 draws seeds 0..1" in note and "--seed-list 2" in note

    drawn.clear()
    sample_tool.main([str(shapes_run), "--device", "cpu", "--out", str(out), "--seed-list", "5", "7", "--baseline"])
    assert [seeds for _, seeds in drawn] == [[5, 7], [5, 7]]  # base and trained, same seeds


def test_sample_without_the_runs_prompt_set_says_which_prompts_it_draws(tmp_path, drawn, capsys):
    run = make_run(tmp_path, lora=True, overrides=["prompt=from_file", "prompt.path=/nonexistent/prompts.txt"])
    sample_tool.main([str(run), "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    (prompts, _), *_ = drawn
    assert prompts == sample_tool.DEFAULT_PROMPTS
    assert "note: sampling" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seeds", "0", "1", "2", "3"], ["--seed-list 0 1 2 3", "number of seeds"]),
        (["--seeds", "0"], ["--seeds 0", "at least 1"]),
        (["--seeds", "abc"], ["--seeds abc", "not an integer"]),
        (["--seeds", "2", "--seed-list", "1"], ["not allowed with"]),
        (["--seed-list", "-1"], ["--seed-list -1", "2**63"]),
    ],
    ids=["old-list-form", "zero", "not-a-number", "both", "negative-seed"],
)
def test_seed_mistakes_are_one_line_in_every_tool(shapes_run, tmp_path, drawn, argv, words):
    messages = [
        one_line(sample_tool.main, shapes_run, "--out", tmp_path / "grid.png", *argv),
        one_line(export_tool.main, shapes_run, "--out", tmp_path / "export", *argv),
        one_line(evaluate_tool.main, shapes_run, *argv),
    ]
    for message in messages:
        for word in words:
            assert word in message, message
    assert not drawn and not (tmp_path / "export").exists()


def test_export_counts_seeds_and_draws_the_runs_prompts(shapes_run, tmp_path, monkeypatch):
    calls = []

    def grid(source, cfg, prompts, seeds, device, model_path):
        calls.append((list(prompts), list(seeds)))
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(export_tool, "sample_grid", grid)
    out = tmp_path / "export"
    export_tool.main([str(shapes_run), "--out", str(out), "--device", "cpu", "--seeds", "2"])
    ((prompts, seeds),) = calls
    assert seeds == [0, 1] and prompts == sample_tool.run_prompts(sample_tool.read_config(str(shapes_run)))[0]
    assert "columns: seeds 0, 1 " in (out / "README.md").read_text()


def test_evaluate_takes_a_seed_list(monkeypatch, tmp_path):
    """evaluate's --seeds N is seeds 0..N-1 (as before); --seed-list names them."""
    import ddpo.evaluation

    class Drawn(Exception):
        pass

    def evaluate(pipeline, prompts, seeds, rewards, batch_size):
        raise Drawn(list(seeds))

    monkeypatch.setattr(ddpo.evaluation, "evaluate", evaluate)
    base = ["experiment=tiny_compressibility", "--device", "cpu", "--out", str(tmp_path)]
    for argv, seeds in ((["--seed-list", "3", "5"], [3, 5]), (["--seeds", "3"], [0, 1, 2]), ([], list(range(16)))):
        with pytest.raises(Drawn) as stop:
            evaluate_tool.main([*base, *argv])
        assert stop.value.args[0] == seeds


@pytest.mark.parametrize("name", ["sample", "evaluate", "export", "plot_runs", "reward_server"])
def test_each_script_runs_its_package_module(name):
    """``python scripts/<name>.py`` in a clone is the installed ``ddpo-...`` command: the same options."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = __import__(f"ddpo.tools.{name}", fromlist=["main"])
    assert module.__doc__.splitlines()[0] in " ".join(result.stdout.split()), result.stdout[:500]
    if name not in ("plot_runs", "reward_server"):  # the tools that sample
        assert "--seed-list" in result.stdout and "--seeds N" in result.stdout


# -- FLUX runs: ddpo-sample and ddpo-evaluate take model=tiny_flux, pipeline=flux -------------------------------
def flux_run(root, overrides=()):
    """A finished tiny FLUX run, fully fine-tuned: its config and final/transformer (the base model's own weights)."""
    from omegaconf import OmegaConf

    from ddpo.models.tiny_flux import build_tiny_flux_pipeline
    from tests.conftest import compose
    from tests.test_flux import FLUX

    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose([*FLUX, "use_lora=false", "sample.num_steps=2", *overrides])
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
    build_tiny_flux_pipeline(seed=0).transformer.save_pretrained(run / "final" / "transformer")
    return run


def test_sample_takes_a_flux_run(tmp_path, capsys):
    """The FLUX loaders are allowed; the run is drawn with FluxPipeline (not DDIM), and its full transformer
    loads as a FluxTransformer2DModel."""
    run = flux_run(tmp_path)
    out = tmp_path / "grid.png"
    sample_tool.main(
        [str(run), "--device", "cpu", "--out", str(out), "--prompts", "a cat", "--seeds", "1", "--baseline"]
    )
    assert out.is_file() and "2 images (full transformer from" in capsys.readouterr().out
    assert sample_tool.KNOWN_LOADERS.keys() >= {f"ddpo.models.{n}" for n in ("load_flux", "tiny_flux_model")}


@pytest.mark.parametrize(
    "settings",
    [{}, {"shift": 3.0}, {"true_cfg_scale": 2.0}, {"guidance_scale": 1.0}],
    ids=["default", "fixed-shift", "true-cfg", "guidance"],
)
def test_sample_draws_a_flux_run_as_it_evaluates(settings):
    """ddpo-sample's FluxPipeline call (scheduler, sampler settings, seeds) draws the images the run's own
    pipeline draws in evaluation, whatever its FLUX settings."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from ddpo.models.tiny_flux import build_tiny_flux_pipeline
    from tests.test_flux import flux_pipeline

    pipeline = {"guidance_scale": 3.5, "true_cfg_scale": 1.0, "shift": None, **settings}
    cfg = OmegaConf.create(
        {
            "model": {"resolution": 64},
            "pipeline": {"_target_": sample_tool.FLUX_PIPELINE, "eval_num_steps": 3, "max_sequence_length": 8}
            | pipeline,
        }
    )
    ours = flux_pipeline(num_steps=2, eval_num_steps=3, **pipeline)
    prompts, seeds = ["a cat", "a horse"], [3, 4]
    with ours.evaluation():
        rollout = ours.sample(ours.encode_prompts(prompts), [torch.Generator().manual_seed(s) for s in seeds])
    expected = (rollout.images.permute(0, 2, 3, 1).numpy() * 255).round()

    pipe = build_tiny_flux_pipeline(seed=0)
    sample_tool.prepare_sampler(pipe, cfg)
    pipe.set_progress_bar_config(disable=True)
    drawn = [sample_tool.sample_rows(pipe, [prompt], [seed], cfg, "cpu")[0][0] for prompt, seed in zip(prompts, seeds)]
    drawn = np.stack([np.asarray(image) for image in drawn]).astype(np.float64)
    assert np.abs(drawn - expected).max() <= 1, np.abs(drawn - expected).max()


def test_evaluate_builds_a_flux_run(monkeypatch, tmp_path):
    """ddpo-evaluate builds a FLUX run's model through the same allow-list and its pipeline from the run's config."""
    import ddpo.evaluation

    class Built(Exception):
        pass

    def evaluate(pipeline, prompts, seeds, rewards, batch_size):
        raise Built(type(pipeline).__name__)

    monkeypatch.setattr(ddpo.evaluation, "evaluate", evaluate)
    overrides = ["experiment=tiny_flux_compressibility"]
    with pytest.raises(Built) as stop:
        evaluate_tool.main([*overrides, "--device", "cpu", "--out", str(tmp_path)])
    assert stop.value.args[0] == "FluxDDPOPipeline"


def test_reward_server_target_is_imported_from_where_it_starts(tmp_path, monkeypatch):
    """``--target my_module.MyReward`` started in the project that holds my_module.py: neither the clone's
    script nor the console script has the current directory on sys.path, so the server adds it (last)."""
    from ddpo.tools import reward_server

    (tmp_path / "my_reward_module.py").write_text(
        "from ddpo.rewards.base import Reward\n\n\n"
        "class MyReward(Reward):\n"
        "    def __init__(self, threshold=0.5):\n"
        "        self.threshold = threshold\n\n"
        "    def __call__(self, images, prompts, metadata):\n"
        "        return images.mean(dim=(1, 2, 3)), {}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_reward_module", raising=False)
    reward, name, target = reward_server.build_reward(["threshold=0.25"], "my_reward_module.MyReward")
    assert (name, target, reward.threshold) == ("MyReward", "my_reward_module.MyReward", 0.25)
    assert sys.path[-1] == str(tmp_path)
