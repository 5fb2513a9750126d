"""Sweeps through submitit: the launcher presets, a real local multirun, and plot_runs.py on its output."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import CONF_DIR, ROOT, TINY, compose, load_script, read_metrics
from tests.scale_out import epochs, failure_report, multirun

PLOT_RUNS = ROOT / "scripts" / "plot_runs.py"


def _compose_hydra(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ddpo.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset,queue_conf", [("local", "LocalQueueConf"), ("slurm", "SlurmQueueConf")])
def test_launcher_preset_sets_only_keys_the_plugin_accepts(preset, queue_conf):
    from hydra_plugins.hydra_submitit_launcher import config as plugin_config

    accepted = {f.name for f in dataclasses.fields(getattr(plugin_config, queue_conf))}
    with open(CONF_DIR / "launcher" / f"{preset}.yaml") as handle:
        written = yaml.safe_load(handle)["hydra"]["launcher"]
    assert set(written) <= accepted, f"keys the plugin does not know: {set(written) - accepted}"

    cfg = _compose_hydra([f"launcher={preset}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("LocalLauncher" if preset == "local" else "SlurmLauncher")
    for key, value in written.items():
        assert launcher[key] == value
    # the training config itself is untouched by a launcher preset
    assert compose([f"launcher={preset}"]) == compose([])


def test_slurm_preset_requeues_on_time_limits_and_keys_researchers_set():
    written = yaml.safe_load((CONF_DIR / "launcher" / "slurm.yaml").read_text())["hydra"]["launcher"]
    for key in (
        "timeout_min",
        "partition",
        "account",
        "qos",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "mem_gb",
        "array_parallelism",
        "setup",
        "additional_parameters",
    ):
        assert key in written
    assert written["max_num_timeout"] > 0
    assert written["signal_delay_s"] > compose([]).preemption_grace_s


def test_untracked_local_overlay_sets_the_clusters_partition_and_account(tmp_path):
    overlay = CONF_DIR / "local" / "slurm.yaml"
    if overlay.exists():
        pytest.skip("conf/local/slurm.yaml exists on this machine (a real cluster's settings); not touching it")
    overlay.parent.mkdir(exist_ok=True)
    try:
        overlay.write_text("hydra:\n  launcher:\n    partition: gpu-long\n    account: my-lab\n")
        launcher = _compose_hydra(["launcher=slurm"]).hydra.launcher
        assert (launcher.partition, launcher.account) == ("gpu-long", "my-lab")
        assert launcher.max_num_timeout > 0  # the rest of the preset still applies
    finally:
        overlay.unlink()
        if not any(overlay.parent.iterdir()):
            overlay.parent.rmdir()


def test_sweep_directories_do_not_collide_within_a_second():
    sweep = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["hydra"]["sweep"]
    assert "%f}" in sweep["dir"], "a sweep dir needs sub-second resolution (two sweeps may start in one second)"
    assert sweep["subdir"] == "${hydra.job.num}"


def test_local_sweep_runs_every_job_and_plot_runs_summarises_it(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [
        "launcher=local",
        "reward=jpeg_compressibility,jpeg_incompressibility",
        *TINY,
        "hydra.launcher.timeout_min=10",
    ]
    result = multirun(sweep, overrides, timeout=400)
    assert result.returncode == 0, failure_report(result, sweep)

    rewards = {}
    for job in ("0", "1"):
        job_dir = sweep / job
        assert epochs(job_dir) == [0, 1], failure_report(result, sweep)
        job_overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        reward = next(o.split("=", 1)[1] for o in job_overrides if o.startswith("reward="))
        rewards[reward] = read_metrics(job_dir)[-1]["reward_mean"]
    assert set(rewards) == {"jpeg_compressibility", "jpeg_incompressibility"}
    assert rewards["jpeg_compressibility"] < 0 < rewards["jpeg_incompressibility"]
    assert list(sweep.glob(".submitit/*/*_log.out")), "submitit keeps each job's stdout under <sweep>/.submitit/"

    plotted = subprocess.run([sys.executable, str(PLOT_RUNS), str(sweep)], capture_output=True, text=True, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    png = sweep / "reward_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["label"] for row in rows) == ["reward=jpeg_compressibility", "reward=jpeg_incompressibility"]
    for row in rows:
        assert int(row["epochs"]) == 2
        assert float(row["final_reward_mean"]) == pytest.approx(rewards[row["label"].split("=", 1)[1]])


def _fake_run(directory, overrides, rewards):
    os.makedirs(directory / ".hydra")
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with open(directory / "metrics.jsonl", "w") as handle:
        for epoch, reward in enumerate(rewards):
            handle.write(json.dumps({"epoch": epoch, "reward_mean": reward, "reward_std": 0.1}) + "\n")


def test_plot_runs_compares_run_directories(tmp_path):
    _fake_run(tmp_path / "a", ["model=tiny", "seed=0"], [1.0, 2.0, 3.0])
    _fake_run(tmp_path / "b", ["model=tiny", "seed=1"], [1.0, 1.5])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(PLOT_RUNS), str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "reward_curves.png").stat().st_size > 0
    with open(out / "summary.csv") as handle:
        rows = {row["label"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"seed=0", "seed=1"}  # labelled by what differs
    assert float(rows["seed=0"]["final_reward_mean"]) == 3.0
    assert float(rows["seed=1"]["best_reward_mean"]) == 1.5
    assert int(rows["seed=1"]["epochs"]) == 2


def test_plot_runs_takes_a_label_per_run(tmp_path):
    _fake_run(tmp_path / "a", ["experiment=testbed", "seed=0"], [1.0, 2.0])
    _fake_run(tmp_path / "b", ["experiment=testbed", "seed=1"], [1.0, 1.5])
    out = tmp_path / "out"
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    labelled = subprocess.run(
        [sys.executable, str(PLOT_RUNS), *runs, "--out-dir", str(out), "--label", "NFT", "--label", "AWM"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert labelled.returncode == 0, labelled.stderr
    with open(out / "summary.csv") as handle:
        assert [row["label"] for row in csv.DictReader(handle)] == ["NFT", "AWM"]
    short = subprocess.run(
        [sys.executable, str(PLOT_RUNS), *runs, "--out-dir", str(out), "--label", "NFT"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert short.returncode != 0 and "1 --label for 2 runs" in short.stderr.strip().splitlines()[-1]


def test_plot_runs_counts_epochs_trained_not_evaluations(tmp_path):
    """A run evaluated every 10 epochs for 30: its summary says 30 epochs and 4 records (was: 4 "epochs")."""
    _fake_run(tmp_path / "a", ["experiment=testbed"], [0.5] * 30)
    with open(tmp_path / "a" / "eval.jsonl", "w") as handle:
        for epoch in (0, 10, 20, 30):
            handle.write(json.dumps({"epoch": epoch, "eval_shape_alignment_correct": 0.3 + epoch / 100}) + "\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(PLOT_RUNS), str(tmp_path / "a"), "--out-dir", str(out)]
        + ["--metric", "eval_shape_alignment_correct"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with open(out / "summary.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (int(row["epochs"]), int(row["records"])) == (30, 4)
    assert float(row["final_eval_shape_alignment_correct"]) == pytest.approx(0.6)


def test_plot_runs_without_metrics_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PLOT_RUNS), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "no metrics.jsonl" in result.stderr


def test_plot_runs_time_axis_counts_training_time_behind_each_point(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, ["algorithm=nft"], [1.0, 2.0, 3.0])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.jsonl", "w") as handle:
        for record, seconds in zip(lines, (60.0, 120.0, 30.0)):
            handle.write(json.dumps(record | {"epoch_time_s": seconds}) + "\n")
    with open(run / "eval.jsonl", "w") as handle:  # "epoch" = epochs trained; evaluation time is not training
        for trained, correct in ((0, 0.4), (2, 0.5), (3, 0.6)):
            handle.write(json.dumps({"epoch": trained, "eval_correct": correct, "eval_time_s": 999.0}) + "\n")
    plot_runs = load_script("plot_runs")
    evals = plot_runs.add_minutes(str(run), plot_runs.read_metrics(str(run), "eval_correct"), from_evals=True)
    assert [r["minutes"] for r in evals] == [0.0, 3.0, 3.5]
    epochs = plot_runs.add_minutes(str(run), plot_runs.read_metrics(str(run), "reward_mean"), from_evals=False)
    assert [r["minutes"] for r in epochs] == [1.0, 3.0, 3.5]

    png = tmp_path / "time.png"
    args = [sys.executable, str(PLOT_RUNS), str(run), "--metric", "eval_correct", "--x", "time", "--out", str(png)]
    result = subprocess.run(args + ["--max-minutes", "3"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 records, final eval_correct 0.5" in result.stdout  # the point at 3.5 minutes is past the budget
    refused = subprocess.run(
        [sys.executable, str(PLOT_RUNS), str(run), "--max-minutes", "3"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "--max-minutes needs --x time" in refused.stderr
