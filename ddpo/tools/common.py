"""What the tools share: one-line errors, and the seed options (``--seeds N`` / ``--seed-list S ...``)."""

from __future__ import annotations

import argparse
import itertools
import re
import sys

SEED_LIMIT = 2**63  # seeds are 63-bit, as the run's own (ddpo/seeds.py); torch.Generator takes them all
MAX_SEED_COUNT = 2**16  # --seeds N: more images per prompt than any tool here is meant to draw


def fail(message: str):
    raise SystemExit(f"error: {message}")


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes (a bad value, an unknown option) end in one ``error:`` line, exit status 1."""

    def error(self, message):
        fail(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        if self.get_default("default_seed_count") is not None:
            refuse_seed_values(argv)
        return super().parse_known_args(argv, namespace)


def add_seed_options(
    parser: argparse.ArgumentParser, default: int, what: str = "per prompt", was_a_list: bool = False
) -> None:
    """``--seeds N`` (seeds 0 .. N-1, as ``eval.seeds``) or ``--seed-list S [S ...]`` (these seeds).

    ``was_a_list``: the tool's ``--seeds`` took seed values before 0.3.0 (sample, export), so one number
    draws a note on stderr saying what it means now. The old form with several values (``--seeds 0 1 2 3``)
    is refused in one line naming ``--seed-list``, by every tool (``OneLineParser``).
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seeds", metavar="N", help=f"the number of seeds {what}: seeds 0 .. N-1 (default {default})")
    group.add_argument("--seed-list", nargs="+", metavar="SEED", help="these seeds instead (integers in [0, 2**63))")
    parser.set_defaults(default_seed_count=default, seeds_were_a_list=was_a_list)


def refuse_seed_values(argv: list[str]) -> None:
    """``--seeds 0 1 2 3`` (seed values, as sample and export took them before 0.3.0): one line, not a
    puzzling "unrecognized arguments"."""
    for i, token in enumerate(argv):
        if token == "--":
            return
        if token == "--seeds":
            values = list(itertools.takewhile(lambda t: re.fullmatch(r"[+-]?\d+", t), argv[i + 1 :]))
            if len(values) > 1:
                values = " ".join(values)
                fail(
                    f"--seeds {values}: --seeds is the number of seeds (0 .. N-1), as in evaluate and "
                    f"eval.seeds; give seed values with --seed-list {values}"
                )


def integer(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        fail(f"{option} {text}: not an integer")


def check_seeds(seeds: list[int], option: str = "--seed-list") -> list[int]:
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            fail(f"{option} {seed}: a seed is an integer in [0, 2**63)")
    return seeds


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The seeds the options name, checked: a mistake is one line."""
    if args.seed_list is not None:
        return check_seeds([integer(s, "--seed-list") for s in args.seed_list])
    if args.seeds is None:
        return list(range(args.default_seed_count))
    count = integer(args.seeds, "--seeds")
    if count < 1:
        fail(f"--seeds {count}: the number of seeds is at least 1 (seed values: --seed-list)")
    if count > MAX_SEED_COUNT:
        fail(f"--seeds {count}: at most {MAX_SEED_COUNT} seeds per prompt")
    if args.seeds_were_a_list:
        drawn = "seed 0" if count == 1 else f"seeds 0..{count - 1}"
        print(
            f"note: --seeds {count} draws {drawn} (a number of seeds since 0.3.0, as in evaluate); "
            f"for the seed {count} alone, give --seed-list {count}",
            file=sys.stderr,
        )
    return list(range(count))
