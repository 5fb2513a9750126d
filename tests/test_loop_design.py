"""The loop's structure: algorithm-neutral, readable, without import circles; the optimizer a config node."""

import ast
from pathlib import Path

from tests.conftest import TINY, compose

ROOT = Path(__file__).resolve().parents[1]


def test_train_reads_top_to_bottom_in_under_100_lines():
    tree = ast.parse((ROOT / "ddpo" / "trainer.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 < 100


def module_imports(path: Path, package: str) -> set[str]:
    """The ddpo modules a module imports (at any depth: imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_no_import_circle_in_ddpo():
    modules = {}
    for path in (ROOT / "ddpo").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {
        name: {m for m in module_imports(path, "ddpo") if m in modules and m != name} for name, path in modules.items()
    }
    # a package's __init__ importing its own submodules is how packages export: not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for name in graph if (c := cycle_from(name))]
    assert not circles, circles[:3]
    assert "ddpo.trainer" not in graph["ddpo.evaluation"]


def test_the_optimizer_is_a_config_node_built_with_the_parameters():
    import torch

    from ddpo.config import _instantiate

    cfg = compose([*TINY])
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == cfg.train.learning_rate
    build = _instantiate(cfg.optimizer, "the optimizer")
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = build([weight])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["lr"] == cfg.train.learning_rate and tuple(group["betas"]) == (0.9, 0.999)
    assert type(group["betas"]) in (list, tuple)  # plain containers: a checkpoint's optimizer state holds no OmegaConf
    sgd = _instantiate(
        compose(
            [
                *TINY,
                "~optimizer",
                "+optimizer._target_=torch.optim.SGD",
                "+optimizer._partial_=true",
                "+optimizer.lr=0.5",
            ]
        ).optimizer,
        "x",
    )
    assert isinstance(sgd([weight]), torch.optim.SGD)


def test_an_optimizer_that_is_not_a_partial_is_one_line(tmp_path):
    from tests.conftest import run_cli

    result = run_cli(tmp_path / "run", [*TINY, "optimizer._partial_=false"])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "optimizer" in last, result.stderr[-2000:]
