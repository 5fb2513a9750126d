"""Prompt sets: callables that draw one prompt (plus small metadata) per call.

A prompt set is built by Hydra (``instantiate(cfg.prompt)``) and called as
``prompt_set(rng) -> (prompt, metadata)``, where ``rng`` is a
``random.Random``. All randomness comes from that ``rng``, so the same seed
gives the same sequence of prompts. ``metadata`` is a small JSON-serialisable
dict. Word lists are read once, at construction, from the package data in
``ddpo/assets`` (located with ``importlib.resources``).
"""

from __future__ import annotations

import abc
import importlib.resources
import os
import random
import stat
import unicodedata
from typing import Any

from ddpo.errors import ConfigError

__all__ = [
    "PromptSet",
    "WordListPrompts",
    "SimpleAnimals",
    "ImagenetAnimals",
    "NounsActivities",
    "FilePrompts",
    "ShapesPrompts",
    "shapes_eval_prompts",
    "load_asset_lines",
]

_ASSET_PACKAGE = "ddpo.assets"


MAX_PROMPT_FILE_BYTES = 64 * 2**20  # read at most this much of a prompt file or word list (a million long prompts)


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_text_file(path: str, what: str, limit: int | None = None) -> str:
    """The UTF-8 text of the regular file ``path``; ConfigError (naming ``what``) for anything else.

    A FIFO, a device or a directory never yields a finite text (a FIFO blocks until a writer comes,
    /dev/zero never ends): it is refused before it is read, and no more than ``limit`` bytes are read.
    Universal newlines, as text-mode ``open``. ``limit`` defaults to MAX_PROMPT_FILE_BYTES.
    """
    limit = MAX_PROMPT_FILE_BYTES if limit is None else limit
    try:
        kind = os.stat(path).st_mode
        if not stat.S_ISREG(kind):
            raise ConfigError(f"{what} {path} is {_file_kind(kind)}, not a regular file")
        # O_NONBLOCK: should the path become a FIFO after the check, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            kind = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(kind):
                raise ConfigError(f"{what} {path} is {_file_kind(kind)}, not a regular file")
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return _decode(data, f"{what} {path}", limit)


def _decode(data: bytes, what: str, limit: int) -> str:
    """``data`` (at most ``limit`` + 1 bytes of ``what``) as text, with universal newlines as text-mode ``open``."""
    if len(data) > limit:
        size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
        raise ConfigError(f"{what} is larger than the {size} read of a prompt file: keep fewer lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_lines(text: str) -> list[str]:
    """One entry per line; surrounding whitespace stripped, blank lines dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_asset_lines(name: str) -> list[str]:
    """Read the non-blank lines of the word list ``name`` shipped in ``ddpo/assets``."""
    resource = importlib.resources.files(_ASSET_PACKAGE).joinpath(name)
    if not resource.is_file():
        available = sorted(
            entry.name for entry in importlib.resources.files(_ASSET_PACKAGE).iterdir() if entry.name.endswith(".txt")
        )
        raise ConfigError(
            f"word list {name!r} is not in the package data ddpo/assets (available: {', '.join(available)})"
        )
    if isinstance(resource, os.PathLike):  # a package on disk: a word list there can be any kind of file
        text = read_text_file(os.fspath(resource), f"word list {name!r}")
    else:  # inside a zip archive
        with resource.open("rb") as handle:
            limit = MAX_PROMPT_FILE_BYTES
            text = _decode(handle.read(limit + 1), f"word list {name!r}", limit)
    lines = _parse_lines(text)
    if not lines:
        raise ConfigError(f"word list {name!r} in ddpo/assets has no entries")
    return lines


def _article(word: str) -> str:
    """Indefinite article for ``word`` (simple vowel rule: 'an ant', 'a cat')."""
    return "an" if word[:1].lower() in "aeiou" else "a"


class PromptSet(abc.ABC):
    """Base class of prompt sets.

    ``__call__(rng)`` returns ``(prompt, metadata)`` using only ``rng`` for
    randomness; ``__len__`` is the number of distinct prompts it can produce.
    """

    @abc.abstractmethod
    def __call__(self, rng: random.Random) -> tuple[str, dict[str, Any]]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class WordListPrompts(PromptSet):
    """Prompt is one word (line) drawn uniformly from a package-data word list."""

    def __init__(self, words_file: str) -> None:
        self.words_file = words_file
        self.words: list[str] = load_asset_lines(words_file)

    def __call__(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        word = rng.choice(self.words)
        return word, {"class": word}

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(words_file={self.words_file!r}, n={len(self)})"


class SimpleAnimals(WordListPrompts):
    """The 45 common animals of the DDPO aesthetic-quality experiment; prompt e.g. ``"cat"``."""

    def __init__(self, words_file: str = "simple_animals.txt") -> None:
        super().__init__(words_file)


class ImagenetAnimals(WordListPrompts):
    """The 398 ImageNet-1k animal classes (indices 0-397, "tench" .. "puffer")."""

    def __init__(self, words_file: str = "imagenet_animals.txt") -> None:
        super().__init__(words_file)


class NounsActivities(PromptSet):
    """Prompt ``"<a/an> <noun> <activity>"``, e.g. ``"a cat riding a bike"``.

    Noun and activity are drawn independently and uniformly; metadata is
    ``{"noun": ..., "activity": ...}``.
    """

    def __init__(
        self,
        nouns_file: str = "simple_animals.txt",
        activities_file: str = "activities.txt",
    ) -> None:
        self.nouns_file = nouns_file
        self.activities_file = activities_file
        self.nouns: list[str] = load_asset_lines(nouns_file)
        self.activities: list[str] = load_asset_lines(activities_file)

    def __call__(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        noun = rng.choice(self.nouns)
        activity = rng.choice(self.activities)
        prompt = f"{_article(noun)} {noun} {activity}"
        return prompt, {"noun": noun, "activity": activity}

    def __len__(self) -> int:
        return len(self.nouns) * len(self.activities)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(nouns_file={self.nouns_file!r}, "
            f"activities_file={self.activities_file!r}, n={len(self)})"
        )


class FilePrompts(PromptSet):
    """Prompts read from a user text file: one prompt per line.

    Blank lines and surrounding whitespace are ignored. A relative ``path`` is
    resolved against the current working directory (the directory the run was
    launched from; Hydra does not change it). Metadata is empty.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        try:
            text = read_text_file(self.path, "prompt file")
        except ConfigError as e:
            raise ConfigError(f"{e} (prompt.path)") from None
        for number, line in enumerate(text.split("\n"), start=1):
            bad = next((c for c in line.rstrip("\r") if c != "\t" and unicodedata.category(c) == "Cc"), None)
            if bad is not None:
                raise ConfigError(
                    f"prompt file {self.path} (prompt.path) line {number}: control character {bad!r}; "
                    "prompts must be plain text"
                )
        self.prompts: list[str] = _parse_lines(text)
        if not self.prompts:
            raise ConfigError(f"prompt file {self.path} (prompt.path) contains no prompts")

    def __call__(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        # Drawn over lines, so a prompt repeated in the file is drawn more often.
        return rng.choice(self.prompts), {}

    def __len__(self) -> int:
        # Number of distinct prompts (repeated lines counted once).
        return len(set(self.prompts))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, n={len(self)})"


SHAPES_SPLITS = ("train", "heldout")


def _shapes_scenes(split: str) -> list:
    from ddpo import shapes

    if split not in SHAPES_SPLITS:
        raise ConfigError(f"prompt.split must be one of {', '.join(SHAPES_SPLITS)} (got {split!r})")
    return [scene for scene in shapes.all_scenes() if shapes.split(scene) == split]


class ShapesPrompts(PromptSet):
    """Captions of the shapes world (ddpo/shapes.py) for one split: ``train`` (RL) or ``heldout``.

    The two splits are disjoint: held-out captions are exactly those that use a colour-shape
    pairing of ``shapes.HELDOUT_PAIRS``. A draw picks a kind (single object, count of two to
    four, relation between two objects) uniformly among ``kinds`` (default all three), then a
    caption of that kind uniformly. Metadata: ``{"kind": ..., "split": ...}``.
    """

    def __init__(self, split: str = "train", kinds: list[str] | None = None) -> None:
        self.split = split
        self.by_kind: dict[str, list[str]] = {}
        for scene in _shapes_scenes(split):
            self.by_kind.setdefault(scene.kind, []).append(scene.caption)
        if kinds is not None:
            unknown = sorted(set(kinds) - set(self.by_kind))
            if unknown or not kinds:
                raise ConfigError(
                    f"prompt.kinds must be a non-empty list of {', '.join(sorted(self.by_kind))} (got {list(kinds)})"
                )
            self.by_kind = {kind: self.by_kind[kind] for kind in kinds}
        self.kinds = sorted(self.by_kind)

    def __call__(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        kind = rng.choice(self.kinds)
        return rng.choice(self.by_kind[kind]), {"kind": kind, "split": self.split}

    def __len__(self) -> int:
        return sum(len(captions) for captions in self.by_kind.values())

    def eval_prompts(self) -> list[str]:
        """The split's fixed evaluation captions of this set's kinds (relations: 16 drawn once)."""
        captions = {c for kind in self.kinds for c in self.by_kind[kind]}
        return [c for c in shapes_eval_prompts(self.split) if c in captions]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)})"


def shapes_eval_prompts(split: str = "heldout", relations: int = 16) -> list[str]:
    """The fixed evaluation captions of a split: every single-object and counting caption and
    ``relations`` relation captions drawn once with a fixed seed (32 captions for the held-out split)."""
    scenes = _shapes_scenes(split)
    counting = [s.caption for s in scenes if s.relation is None]
    relation = [s.caption for s in scenes if s.relation is not None]
    return counting + random.Random(0).sample(relation, min(relations, len(relation)))
