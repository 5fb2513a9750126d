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
