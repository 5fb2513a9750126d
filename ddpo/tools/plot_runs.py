"""Compare the runs of a sweep: reward per epoch (mean ± std), one line per job, and a CSV summary.

    ddpo-plot multirun/2025-01-31/12-00-00-000000
    ddpo-plot outputs/run_a outputs/run_b --out-dir comparisons/ --metric reward_mean

    ddpo-plot outputs/run_a --metric eval_shape_alignment_correct --metric eval_shape_proxy_mean
    ddpo-plot outputs/ddpo outputs/nft --metric eval_shape_alignment_correct --x time --max-minutes 20

(in a clone: ``python scripts/plot_runs.py`` with the same arguments).

Each argument is a run directory (it holds ``metrics.jsonl``) or a sweep directory (its job
subdirectories hold them). ``eval_*`` metrics are read from ``eval.jsonl`` (written by
``eval.every``; the x axis is then the number of epochs trained, 0 = the base model) and drawn
with their 95% confidence band; ``--metric`` may be given several times (one line per run and metric). A line is labelled by the job's overrides (``.hydra/overrides.yaml``)
that differ between the runs shown. Writes ``reward_curves.png`` and ``summary.csv`` (one row per
job: its final and best reward) into ``--out-dir``: the sweep directory when there is one
argument, else the working directory.

``--x time`` puts the minutes of training on the x axis instead of epochs: the sum of the
epochs' ``epoch_time_s`` (sampling, reward and training; evaluation excluded) up to each point, so
that methods with cheap and costly epochs compare at the same compute; ``--max-minutes`` cuts the
curves at a budget.
"""

import argparse
import bisect
import csv
import itertools
import json
import os
import sys

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
OVERRIDES_FILE = os.path.join(".hydra", "overrides.yaml")


def find_runs(paths: list[str]) -> list[str]:
    """Run directories under ``paths``: each path itself if it is a run, else its job subdirectories."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, METRICS_FILE)):
            runs.append(path)
            continue
        if not os.path.isdir(path):
            raise SystemExit(f"error: {path} is not a directory")
        jobs = [
            os.path.join(path, name)
            for name in os.listdir(path)
            if os.path.isfile(os.path.join(path, name, METRICS_FILE))
        ]
        if not jobs:
            raise SystemExit(f"error: no {METRICS_FILE} in {path} nor in its subdirectories")
        runs.extend(sorted(jobs, key=_job_order))
    return runs


def _job_order(path: str):
    name = os.path.basename(path)
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def source_file(run_dir: str, metric: str) -> str:
    """The file ``metric`` is read from: eval.jsonl for ``eval_*`` metrics when it exists, else metrics.jsonl."""
    evals = metric.startswith("eval_") and os.path.isfile(os.path.join(run_dir, EVAL_FILE))
    return EVAL_FILE if evals else METRICS_FILE


def read_metrics(run_dir: str, metric: str = "reward_mean") -> list[dict]:
    """The run's records that hold ``metric``: eval.jsonl for ``eval_*`` metrics when it exists."""
    with open(os.path.join(run_dir, source_file(run_dir, metric))) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return sorted(records, key=lambda r: r["epoch"])


def read_overrides(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, OVERRIDES_FILE)
    if not os.path.isfile(path):
        return []
    from omegaconf import OmegaConf

    return [str(item) for item in OmegaConf.load(path)]


def labels_for(runs: list[str], overrides: list[list[str]]) -> list[str]:
    """Each run's overrides that are not shared by all runs (its directory name if none differ)."""
    shared = set.intersection(*(set(o) for o in overrides)) if len(runs) > 1 else set()
    labels = []
    for run, items in zip(runs, overrides):
        own = [item for item in items if item not in shared]
        labels.append(" ".join(own) if own else os.path.basename(os.path.normpath(run)))
    return labels


def add_minutes(run_dir: str, records: list[dict], from_evals: bool) -> list[dict]:
    """``records`` with ``minutes``: the training time (metrics.jsonl's ``epoch_time_s`` summed) behind each.

    A metrics.jsonl record counts its own epoch; an eval.jsonl record (``epoch`` = epochs trained,
    0 = before training) counts the epochs before it."""
    epochs = read_metrics(run_dir)  # metrics.jsonl, by epoch
    missing = [r["epoch"] for r in epochs if r.get("epoch_time_s") is None]
    if missing:
        raise SystemExit(f"error: {run_dir}: epoch {missing[0]} has no epoch_time_s (needed by --x time)")
    numbers = [r["epoch"] for r in epochs]
    seconds = [0.0, *itertools.accumulate(r["epoch_time_s"] for r in epochs)]  # before each epoch, and after all
    trained = (lambda r: r["epoch"]) if from_evals else (lambda r: r["epoch"] + 1)
    return [r | {"minutes": seconds[bisect.bisect_left(numbers, trained(r))] / 60} for r in records]


def read_series(run_dir: str, metric: str, x: str, max_minutes: float | None) -> list[dict]:
    """The run's records of ``metric``; with ``x="time"`` each with its ``minutes``, cut at ``max_minutes``."""
    records = read_metrics(run_dir, metric)
    if x != "time":
        return records
    records = add_minutes(run_dir, records, source_file(run_dir, metric) == EVAL_FILE)
    return [r for r in records if max_minutes is None or r["minutes"] <= max_minutes]


def summarise(run: str, label: str, items: list[str], records: list[dict], metric: str, evals: bool) -> dict:
    """One row of summary.csv. ``epochs`` is the epochs trained at the last record: an eval.jsonl record's
    ``epoch`` (epochs trained), a metrics.jsonl record's epoch + 1 (it counts its own); ``records`` the points."""
    values = [r[metric] for r in records if metric in r]
    last = records[-1] if records else {}
    return {
        "run": run,
        "label": label,
        "overrides": " ".join(items),
        "epochs": (last["epoch"] + (0 if evals else 1)) if records else 0,
        "records": len(records),
        f"final_{metric}": last.get(metric, ""),
        "final_reward_std": last.get("reward_std", ""),
        f"best_{metric}": max(values) if values else "",
    }


def plot(series: list[tuple[str, list[dict], str]], path: str, x: str = "epoch", title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    metrics = list(dict.fromkeys(metric for _, _, metric in series))
    for label, records, metric in series:
        records = [r for r in records if r.get(metric) is not None]
        if not records:
            continue
        epochs = np.array([r["minutes" if x == "time" else "epoch"] for r in records])
        mean = np.array([r[metric] for r in records])
        short = label if len(label) <= 70 else label[:67] + "..."
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=short)
        if metric == "reward_mean":
            std = np.array([r.get("reward_std", 0.0) for r in records])
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=line.get_color())
        elif all(r.get(metric + "_ci_low") is not None for r in records):
            low = np.array([r[metric + "_ci_low"] for r in records])
            high = np.array([r[metric + "_ci_high"] for r in records])
            ax.fill_between(epochs, low, high, alpha=0.2, color=line.get_color())
    evals = all(m.startswith("eval_") for m in metrics)
    if x == "time":
        ax.set_xlabel("minutes of training (evaluation excluded)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epochs trained" if evals else "epoch")
    if len(metrics) == 1:
        ax.set_ylabel(
            "reward (mean ± std)" if metrics[0] == "reward_mean" else metrics[0] + (" (95% CI)" if evals else "")
        )
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep directories and/or run directories")
    parser.add_argument("--out-dir", help="where to write reward_curves.png and summary.csv")
    parser.add_argument(
        "--metric",
        action="append",
        help="a metrics.jsonl (or eval.jsonl, for eval_*) key to plot; repeat for several (default reward_mean)",
    )
    parser.add_argument("--out", help="the PNG to write (default <out-dir>/reward_curves.png)")
    parser.add_argument(
        "--x", choices=["epoch", "time"], default="epoch", help="x axis: epochs, or minutes of training"
    )
    parser.add_argument("--max-minutes", type=float, help="with --x time: drop the points past this training time")
    parser.add_argument("--title", help="the plot's title")
    parser.add_argument(
        "--label",
        action="append",
        help="a run's name in the legend, once per run in the order found (default: the overrides that differ)",
    )
    args = parser.parse_args(argv)
    if args.max_minutes is not None and args.x != "time":
        parser.error("--max-minutes needs --x time")
    metrics = args.metric or ["reward_mean"]

    runs = find_runs(args.paths)
    out_dir = args.out_dir or (args.paths[0] if len(args.paths) == 1 else os.getcwd())
    os.makedirs(out_dir, exist_ok=True)
    overrides = [read_overrides(run) for run in runs]
    labels = labels_for(runs, overrides)
    if args.label:
        if len(args.label) != len(runs):
            raise SystemExit(f"error: {len(args.label)} --label for {len(runs)} runs: give one per run, in order")
        labels = args.label
    series = [
        (
            label if len(metrics) == 1 else f"{label} {metric}" if len(runs) > 1 else metric,
            read_series(run, metric, args.x, args.max_minutes),
            metric,
        )
        for run, label in zip(runs, labels)
        for metric in metrics
    ]
    missing = [
        metric
        for metric in metrics
        if not any(r.get(metric) is not None for _, recs, m in series if m == metric for r in recs)
    ]
    if missing:
        raise SystemExit(f"error: no run has {', '.join(missing)} (eval_* metrics need eval.every > 0)")
    png = args.out or os.path.join(out_dir, "reward_curves.png")
    plot(series, png, args.x, args.title)
    metric = metrics[0]
    records = [recs for _, recs, m in series if m == metric]  # one per run, in run order
    rows = [
        summarise(run, label, items, recs, metric, source_file(run, metric) == EVAL_FILE)
        for run, label, items, recs in zip(runs, labels, overrides, records)
    ]
    table = os.path.join(out_dir, "summary.csv")
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(
            f"{row['label']}: {row['epochs']} epochs, {row['records']} records, final {metric} {row[f'final_{metric}']}"
        )
    print(f"wrote {png} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
