"""``python train.py --help`` (and ``ddpo-train --help``): the config groups with a line on each option, and
the main keys with their comments.

The YAML comments are this project's documentation of its options, and Hydra's stock help prints the
composed config without them; so the help is read from the config files themselves: each option's
first comment line (after ``# @package``) and each key's trailing comment in ``config.yaml``. Hydra's
own help stays at ``--hydra-help``; ``--cfg job`` prints the config an exact command composes.
"""

from __future__ import annotations

import os
import re
import textwrap

GROUP_ORDER = ("model", "pipeline", "algorithm", "reward", "prompt", "logger", "experiment", "launcher")
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def description(path: str, limit: int = 170) -> str:
    """The first sentence of a config file's leading comment (the ``@package`` directive skipped)."""
    block = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line.startswith("#"):
                if line or block:  # the first key, or the end of the leading comment
                    break
                continue
            text = line.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            if not text and block:
                break
            block.append(text)
    text = " ".join(t for t in block if t)
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    sentence = text[: end.start() + 1] if end else text
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rsplit(" ", 1)[0] + "..."


def groups(config_dir: str) -> dict[str, list[tuple[str, str]]]:
    """{group: [(option, description), ...]} for every folder of YAML files (``local/``, a user's own, skipped)."""
    found = {}
    for name in sorted(os.listdir(config_dir)):
        folder = os.path.join(config_dir, name)
        if not os.path.isdir(folder) or name in ("local", "__pycache__"):
            continue
        options = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        if options:
            found[name] = [(o, description(os.path.join(folder, o + ".yaml"))) for o in options]
    ordered = [g for g in GROUP_ORDER if g in found] + [g for g in found if g not in GROUP_ORDER]
    return {g: found[g] for g in ordered}


def main_keys(config_path: str) -> list[tuple[str, str, str]]:
    """[(dotted key, value, comment), ...] of ``config.yaml``'s keys with a value, in file order."""
    keys, parents = [], []
    with open(config_path, encoding="utf-8") as handle:
        for line in handle:
            match = KEY_LINE.match(line.rstrip("\n"))
            if not match or line.lstrip().startswith("-"):
                continue
            depth = len(match["indent"]) // 2
            parents = parents[:depth]
            key, value = match["key"], match["value"].strip()
            if key in ("defaults", "hydra") and depth == 0:
                parents.append(key)
                continue
            if parents and parents[0] in ("defaults", "hydra"):
                continue
            if value:
                keys.append((".".join([*parents, key]), value, (match["comment"] or "").strip()))
            else:
                parents.append(key)
    return keys


def help_text(config_dir: str, command: str = "python train.py", width: int = 110) -> str:
    lines = [
        f"{command}: reinforcement-learning fine-tuning of text-to-image diffusion models (Hydra app)",
        "",
        f"usage: {command} [group=option ...] [key=value ...]",
        f"       {command} experiment=testbed                 # a preset: the testbed that learns on a laptop",
        f"       {command} -m seed=0,1,2 launcher=slurm      # a sweep",
        "",
        "Config groups (pick one option each):",
    ]
    for group, options in groups(config_dir).items():
        lines.append(f"  {group}:")
        column = max(len(o) for o, _ in options) + 2
        for option, text in options:
            wrapped = textwrap.wrap(text, width=max(width - column - 6, 30)) or [""]
            lines.append(f"    {option.ljust(column)}{wrapped[0]}")
            lines.extend(f"    {' ' * column}{more}" for more in wrapped[1:])
    lines += ["", "Main keys (config.yaml; key=value to change one):"]
    keys = main_keys(os.path.join(config_dir, "config.yaml"))
    column = min(max(len(k) + len(v) for k, v, _ in keys) + 6, 44)
    for key, value, comment in keys:
        head = f"  {key} = {value}"
        wrapped = textwrap.wrap(comment, width=max(width - column, 30)) or [""]
        if len(head) >= column:  # a long value: its comment starts on the next line
            lines.append(head)
            lines.extend(f"{' ' * column}{more}" for more in wrapped if more)
            continue
        lines.append(f"{head.ljust(column)}{wrapped[0]}".rstrip())
        lines.extend(f"{' ' * column}{more}" for more in wrapped[1:])
    lines += [
        "",
        "Each group's own keys are in its option's file (conf/<group>/<option>.yaml), documented there.",
        f"{command} [overrides] --cfg job   prints the config those overrides compose; --hydra-help: Hydra's flags.",
    ]
    return "\n".join(lines)


def print_help_if_asked(argv: list[str], config_dir: str, command: str) -> bool:
    """Print the help and return True when ``argv`` is only a request for it (``--help`` or ``-h``).

    With overrides beside it, Hydra answers (it composes them first, so a misspelt option is still an
    error); ``--hydra-help`` is always Hydra's."""
    if argv and all(a in ("--help", "-h") for a in argv):
        print(help_text(config_dir, command))
        return True
    return False
