"""Held-out evaluation: fixed prompts x fixed seeds, every reward of the config, CIs and diversity.

The same function serves ``scripts/evaluate.py`` (a finished run or a base model) and ``eval.every``
during training, so both report the same numbers for the same weights:

- images: each (prompt, seed) pair is sampled with the run's own sampler (``pipeline.sample``)
  from a generator seeded by ``eval_seed(prompt index, seed)``, so an image does not depend on the
  batch it is drawn in, nor on the number of processes;
- rewards: each named reward scores every image; its mean and every ``info`` value (per-attribute
  accuracies for ``shape_alignment``) get a 95% confidence interval (Wilson's for 0/1 values,
  the normal approximation otherwise; NaN entries, an attribute a prompt does not have, are left out);
- diversity: the mean pairwise RMS distance between the images of one prompt (pixels in [0, 1]),
  averaged over prompts, with a CI over prompts. Mode collapse (every seed the same picture)
  shows as diversity falling while a reward rises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddpo.seeds import derived_seed

Z95 = 1.959963984540054
EVAL_TAG = 2**40 + 1  # above every run seed (< 2**32): evaluation noise never repeats a training sample's


def eval_seed(prompt_index: int, seed: int) -> int:
    return derived_seed(EVAL_TAG, prompt_index, seed)


@dataclass
class EvalResult:
    prompts: list[str]  # one per image, prompt-major: prompt 0 seed 0..S-1, prompt 1 ...
    seeds: list[int]
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], CPU
    scores: dict[str, np.ndarray]  # "<reward>" and "<reward>/<info key>" -> (N,)
    summary: dict

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        return flat_metrics(self.summary, prefix)


def generate(pipeline, pairs: list[tuple[int, str, int]], batch_size: int, show: bool = True) -> torch.Tensor:
    """Images of (prompt index, prompt, seed) triples, in order, with the pipeline's sampler (no gradients);
    a progress bar on a terminal (``show``: False on the other processes)."""
    from tqdm.auto import tqdm

    from ddpo.progress import bar_disabled

    images = []
    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc="evaluation", unit="batch", leave=False, disable=bar_disabled(show)):
        chunk = pairs[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(eval_seed(i, s)) for i, _, s in chunk]
        with torch.no_grad():
            conditioning = pipeline.encode_prompts([p for _, p, _ in chunk])
            images.append(pipeline.sample(conditioning, generators).images.float().cpu())
    return torch.cat(images)


def score(images: torch.Tensor, prompts: list[str], rewards: dict, batch_size: int) -> dict[str, np.ndarray]:
    """Every reward's value and info entries for every image."""
    from ddpo.reward_calls import check_reward_output

    scores: dict[str, list] = {}
    for name, reward in rewards.items():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            values, info = check_reward_output(
                name, reward(batch, prompts[start : start + batch_size], [{} for _ in range(len(batch))]), len(batch)
            )
            scores.setdefault(name, []).append(values.numpy())
            for key, value in info.items():
                scores.setdefault(f"{name}/{key}", []).append(value.numpy())
    return {key: np.concatenate(parts).astype(np.float64) for key, parts in scores.items()}


def interval(values: np.ndarray) -> dict:
    """Mean and 95% CI of the finite values: Wilson's interval for 0/1 values, else Student's t interval
    (mean +- t(0.975, n - 1) s.e., scipy's t: over a few seeds 1.96 would be too narrow, 4.30 at n = 3)."""
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    mean = float(values.mean())
    if np.all((values == 0) | (values == 1)):
        centre = (mean + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        return {"mean": mean, "ci95": [centre - half, centre + half], "n": n}
    if n < 2:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n": n}
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def diversity(images: torch.Tensor, num_prompts: int) -> np.ndarray:
    """Per prompt: the mean pairwise RMS pixel distance between its images (NaN with one seed)."""
    flat = images.reshape(num_prompts, -1, images[0].numel()).double()
    per_prompt = []
    for group in flat:
        k = len(group)
        if k < 2:
            per_prompt.append(math.nan)
            continue
        distance = torch.cdist(group, group) / math.sqrt(group.shape[1])
        per_prompt.append(float(distance.sum() / (k * (k - 1))))
    return np.array(per_prompt)


def evaluate(pipeline, prompts: list[str], seeds: list[int], rewards: dict, batch_size: int) -> EvalResult:
    images = generate(pipeline, [(i, p, s) for i, p in enumerate(prompts) for s in seeds], batch_size)
    image_prompts = [p for p in prompts for _ in seeds]
    scores = score(images, image_prompts, rewards, batch_size)
    part = {
        "indices": list(range(len(prompts))),
        "scores": scores,
        "diversity": diversity(images, len(prompts)).tolist(),
    }
    summary = summarise_parts([part], prompts, seeds)
    return EvalResult(image_prompts, [s for _ in prompts for s in seeds], images, scores, summary)


def eval_prompts(prompt_set) -> list[str]:
    """The fixed evaluation prompts of a prompt set (``eval_prompts()``), or its word list / file lines."""
    from ddpo.errors import ConfigError

    if hasattr(prompt_set, "eval_prompts"):
        return list(prompt_set.eval_prompts())
    for attribute in ("words", "prompts"):
        if isinstance(getattr(prompt_set, attribute, None), list):
            return list(dict.fromkeys(getattr(prompt_set, attribute)))
    raise ConfigError(
        f"the evaluation prompt set {prompt_set!r} has no fixed list of prompts (eval.prompt: use "
        "a word list, a file, or prompt sets with eval_prompts(), such as shapes_heldout)"
    )


def write_outputs(result: EvalResult, directory, label: str = "") -> list[str]:
    """``summary.json`` and ``samples.csv`` (one row per image: prompt, seed, every score)."""
    import csv
    import json
    import os

    from ddpo.logging import finite_json

    os.makedirs(directory, exist_ok=True)
    paths = []
    summary_path = os.path.join(directory, f"summary{label}.json")
    with open(summary_path, "w") as handle:
        handle.write(json.dumps(finite_json(result.summary), indent=2, allow_nan=False) + "\n")
    paths.append(summary_path)
    csv_path = os.path.join(directory, f"samples{label}.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = list(result.scores)
        writer.writerow(["prompt", "seed", *names])
        for i, (prompt, seed) in enumerate(zip(result.prompts, result.seeds)):
            writer.writerow([prompt, seed, *(_cell(result.scores[n][i]) for n in names)])
    paths.append(csv_path)
    return paths


def _cell(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.6g}"


class Evaluator:
    """``eval.every`` during training: the evaluation above on the current policy, sharded over processes.

    Each process samples and scores the prompts ``rank::world_size``; the main process gathers the
    scores (not the images) and summarises them, so the numbers equal a 1-process evaluation.
    """

    def __init__(self, prompts: list[str], seeds: list[int], rewards: dict, batch_size: int, every: int):
        self.prompts, self.seeds, self.rewards = prompts, seeds, rewards
        self.batch_size, self.every = batch_size, every

    def due(self, epochs_trained: int, num_epochs: int) -> bool:
        return self.every > 0 and (epochs_trained % self.every == 0 or epochs_trained == num_epochs)

    def run(self, pipeline, accelerator) -> dict:
        """The summary (on every process) of the current policy's evaluation."""
        from accelerate.utils import gather_object

        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, len(self.prompts), world))
        part = {"indices": mine, "scores": {}, "diversity": []}
        if mine:
            prompts = [self.prompts[i] for i in mine]
            pairs = [(i, p, s) for i, p in zip(mine, prompts) for s in self.seeds]
            images = generate(pipeline, pairs, self.batch_size, show=accelerator.is_local_main_process)
            part["scores"] = score(images, [p for _, p, _ in pairs], self.rewards, self.batch_size)
            part["diversity"] = diversity(images, len(mine)).tolist()
        parts = gather_object([part]) if world > 1 else [part]
        return summarise_parts(parts, self.prompts, self.seeds)


def summarise_parts(parts: list[dict], prompts: list[str], seeds: list[int]) -> dict:
    """Reassemble per-process parts in prompt order and summarise them as ``evaluate`` does."""
    order = sorted((index, n, part) for part in parts for n, index in enumerate(part["indices"]))
    k = len(seeds)
    names = next((list(part["scores"]) for part in parts if part["scores"]), [])
    scores = {
        name: np.concatenate([part["scores"][name][n * k : (n + 1) * k] for _, n, part in order]) for name in names
    }
    per_prompt = np.array([part["diversity"][n] for _, n, part in order])
    return {
        "num_prompts": len(prompts),
        "seeds": list(seeds),
        "num_images": len(prompts) * k,
        "scores": {name: interval(values) for name, values in scores.items()},
        "diversity": interval(per_prompt),
    }


def flat_metrics(summary: dict, prefix: str = "eval_") -> dict[str, float]:
    """Flat numbers of a summary for metrics.jsonl and trackers: ``eval_<reward>_mean``,
    ``eval_<reward>_<info>``, ``eval_diversity`` (and their ``_ci_low`` / ``_ci_high`` bounds)."""
    flat = {}
    for name, stats in summary["scores"].items():
        key = prefix + name.replace("/", "_") + ("" if "/" in name else "_mean")
        flat[key] = stats["mean"]
        flat[key + "_ci_low"], flat[key + "_ci_high"] = stats["ci95"]
    flat[prefix + "diversity"] = summary["diversity"]["mean"]
    return flat


def comparison_grid(rows: list[tuple[str, list, list]], tile: int = 96):
    """One row per prompt: its base images, a gap, its trained images (same seeds), prompt above.

    Not diffusers' ``make_image_grid`` (same-sized images edge to edge, no text): the labels and the
    gap between base and trained images are the point of this grid."""
    from PIL import Image, ImageDraw

    from ddpo.logging import to_pil

    columns = max(len(base) + len(trained) for _, base, trained in rows)
    gap, label = tile // 4, 14
    width = columns * tile + gap
    grid = Image.new("RGB", (width, len(rows) * (tile + label) + label), "white")
    draw = ImageDraw.Draw(grid)
    half = max(len(base) for _, base, _ in rows)
    draw.text((2, 1), "base", fill="black")
    draw.text((half * tile + gap + 2, 1), "trained (same seeds)", fill="black")
    for r, (prompt, base, trained) in enumerate(rows):
        y = label + r * (tile + label)
        draw.text((2, y + 1), prompt, fill="black")
        for c, image in enumerate(base):
            grid.paste(to_pil(image).convert("RGB").resize((tile, tile), Image.NEAREST), (c * tile, y + label))
        for c, image in enumerate(trained):
            grid.paste(
                to_pil(image).convert("RGB").resize((tile, tile), Image.NEAREST),
                (half * tile + gap + c * tile, y + label),
            )
    return grid
