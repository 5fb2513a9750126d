"""The command-line tools around training, one module each, installed as console scripts.

- ``ddpo-sample`` (``python scripts/sample.py`` in a clone): a run's base and trained model on the same
  prompts and seeds;
- ``ddpo-evaluate`` (``scripts/evaluate.py``): held-out evaluation of a run or a base model;
- ``ddpo-export`` (``scripts/export.py``): a Hub-ready folder (weights, model card, plots), ``--push``;
- ``ddpo-plot`` (``scripts/plot_runs.py``): reward and evaluation curves of runs and sweeps;
- ``ddpo-reward-server`` (``scripts/reward_server.py``): a reward served over HTTP for ``reward=remote``.

(``ddpo-train`` is ``python train.py``: ``ddpo/cli.py``.) The files in ``scripts/`` import these
modules, so both spellings take the same options. Where a tool samples, ``--seeds N`` is a number of
seeds per prompt (seeds 0 .. N-1), as ``eval.seeds`` is in the config; ``--seed-list`` gives seed values.
"""
