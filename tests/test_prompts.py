import json
import random
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpo.errors import ConfigError
from ddpo.prompts import (
    FilePrompts,
    ImagenetAnimals,
    NounsActivities,
    PromptSet,
    SimpleAnimals,
    load_asset_lines,
)

PROMPT_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "prompt"


def _draw(prompt_set, seed, n=50):
    rng = random.Random(seed)
    return [prompt_set(rng) for _ in range(n)]


def test_simple_animals_count_and_prompt():
    ps = SimpleAnimals()
    assert isinstance(ps, PromptSet)
    assert len(ps) == 45
    assert len(set(ps.words)) == 45
    assert ps.words[0] == "cat"
    assert ps.words[-1] == "kangaroo"
    prompt, meta = ps(random.Random(0))
    assert prompt in ps.words
    assert meta == {"class": prompt}


def test_imagenet_animals_count():
    ps = ImagenetAnimals()
    assert len(ps) == 398
    assert len(ps.words) == 398
    assert ps.words[0] == "tench"
    assert ps.words[1] == "goldfish"
    assert ps.words[-1] == "puffer"
    assert all(w.strip() for w in ps.words)
    assert "abacus" not in ps.words


def test_activities_file():
    assert load_asset_lines("activities.txt") == [
        "riding a bike",
        "playing chess",
        "washing dishes",
    ]


def test_missing_asset_raises_config_error():
    with pytest.raises(ConfigError, match="no_such_list.txt"):
        SimpleAnimals(words_file="no_such_list.txt")


@pytest.mark.parametrize("cls", [SimpleAnimals, ImagenetAnimals, NounsActivities])
def test_determinism(cls):
    ps = cls()
    a = _draw(ps, seed=123)
    b = _draw(ps, seed=123)
    c = _draw(ps, seed=456)
    assert a == b
    assert a != c
    # metadata is JSON-serialisable
    json.dumps([m for _, m in a])


def test_uses_only_given_rng():
    ps = SimpleAnimals()
    rng = random.Random(7)
    random.seed(0)
    first = [ps(rng)[0] for _ in range(10)]
    rng = random.Random(7)
    random.seed(999)
    second = [ps(rng)[0] for _ in range(10)]
    assert first == second


def test_nouns_activities_metadata():
    ps = NounsActivities()
    assert len(ps) == 45 * 3
    for prompt, meta in _draw(ps, seed=0, n=200):
        assert set(meta) == {"noun", "activity"}
        assert meta["noun"] in ps.nouns
        assert meta["activity"] in ps.activities
        article = "an" if meta["noun"][0] in "aeiou" else "a"
        assert prompt == f"{article} {meta['noun']} {meta['activity']}"
    assert NounsActivities()(random.Random(1))[0].startswith(("a ", "an "))


def test_from_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n  a red apple  \n\n\na blue car\n   \na red apple\n", encoding="utf-8")
    ps = FilePrompts(str(f))
    assert ps.prompts == ["a red apple", "a blue car", "a red apple"]
    assert len(ps) == 2
    drawn = _draw(ps, seed=3)
    assert drawn == _draw(ps, seed=3)
    assert {p for p, _ in drawn} <= {"a red apple", "a blue car"}
    assert all(m == {} for _, m in drawn)


def test_from_file_relative_path(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("hello\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ps = FilePrompts("p.txt")
    assert Path(ps.path) == tmp_path / "p.txt"
    assert ps(random.Random(0)) == ("hello", {})


def test_from_file_missing(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as exc:
        FilePrompts(str(missing))
    assert str(missing) in str(exc.value)
    assert "prompt.path" in str(exc.value)


def test_from_file_empty(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\t\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        FilePrompts(str(empty))
    assert str(empty) in str(exc.value)
    assert "prompt.path" in str(exc.value)


def test_from_file_yaml_path_is_mandatory():
    cfg = OmegaConf.load(PROMPT_CONF_DIR / "from_file.yaml")
    assert OmegaConf.is_missing(cfg, "path")


@pytest.mark.parametrize(
    "name, cls, n",
    [
        ("animals", SimpleAnimals, 45),
        ("imagenet_animals", ImagenetAnimals, 398),
        ("nouns_activities", NounsActivities, 135),
        ("from_file", FilePrompts, 2),
    ],
)
def test_yaml_instantiates(name, cls, n, tmp_path):
    cfg = OmegaConf.load(PROMPT_CONF_DIR / f"{name}.yaml")
    assert cfg._target_ == f"ddpo.prompts.{cls.__name__}"
    if name == "from_file":
        f = tmp_path / "prompts.txt"
        f.write_text("one\ntwo\n", encoding="utf-8")
        cfg.path = str(f)
    ps = instantiate(cfg)
    assert isinstance(ps, cls)
    assert len(ps) == n
    prompt, meta = ps(random.Random(0))
    assert isinstance(prompt, str) and prompt
    json.dumps(meta)


def test_conf_prompt_dir_complete():
    names = {p.stem for p in PROMPT_CONF_DIR.glob("*.yaml")}
    assert {"animals", "imagenet_animals", "nouns_activities", "from_file"} <= names


@pytest.mark.parametrize("bad", ["\x00", "\x1b", "\x7f"])
def test_from_file_rejects_control_characters_naming_the_line(tmp_path, bad):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a cat\na dog{bad}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: control character"):
        FilePrompts(path)


def test_per_prompt_stats_group_prompts_with_trailing_nuls():
    """numpy compares strings without their trailing NULs: such prompts once got uninitialised advantages."""
    import numpy as np

    from ddpo.stat_tracking import PerPromptStatTracker

    tracker = PerPromptStatTracker(buffer_size=16, min_count=2)
    advantages = tracker.update(["a\x00", "a\x00", "a", "a"], np.array([1.0, 3.0, 10.0, 30.0]))
    assert np.isfinite(advantages).all()
    np.testing.assert_allclose(advantages, [-1, 1, -1, 1], atol=1e-5)
    assert sorted(tracker.buffers) == ["a", "a\x00"]
