"""Run records: metrics.jsonl, the tracker handed to image hooks, image grids and the reward curve."""

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ddpo.errors import DDPOError

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"  # one line per evaluation (eval.every): "epoch" is the number of epochs trained
WANDB_RUN_ID_FILE = "run_id"  # in <run>/wandb/


def _not_a_file(mode: int) -> str:
    """What a path that is not a regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    return "not a regular file"


_NOT_JSON = "it is not JSON (cut off or damaged)"


def _metrics_record(raw: bytes) -> tuple[dict | None, str]:
    """``(record, "")`` for a line that is an epoch's record, else ``(None, why it is not)``."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, _NOT_JSON
    if not isinstance(record, dict):
        what = {list: "an array", str: "a string"}.get(type(record)) or json.dumps(record)  # or a number, null
        return None, f"it is {what}, not a JSON object"
    if "epoch" not in record:
        return None, 'it has no "epoch"'
    epoch = record["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return None, f'its "epoch" is {json.dumps(epoch)}, not an integer >= 0'
    return record, ""


class MetricsFile:
    """One JSON object per epoch, appended as each epoch ends (readable while the run goes on).

    Lines are strict JSON: a non-finite number is written as null (bare NaN is not JSON). Reading
    keeps the lines that are records (a JSON object with an integer ``epoch`` >= 0) and drops any
    other with a warning naming the file and line: a torn last line (the process died while writing
    it), damage anywhere else, a line that is not an object. A path that cannot be the file (a
    directory, a FIFO, which would block) is a DDPOError naming it.
    """

    def __init__(self, directory: str, name: str = METRICS_FILE):
        self.path = os.path.join(directory, name)

    def _exists(self) -> bool:
        """Whether the file is there; something else at its path (a directory, a FIFO) is a DDPOError."""
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return False
        except OSError as error:
            raise DDPOError(f"cannot use {self.path}: {error.strerror or error}") from None
        if not stat.S_ISREG(mode):
            raise DDPOError(
                f"{self.path} is {_not_a_file(mode)}, not a file: move it away (the run keeps its records there)"
            )
        return True

    def read(self) -> list[dict]:
        if not self._exists():
            return []
        with open(self.path, "rb") as handle:
            lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
        records = []
        for index, (number, line) in enumerate(lines):
            record, problem = _metrics_record(line)
            if record is not None:
                records.append(record)
            elif index == len(lines) - 1 and problem == _NOT_JSON:
                log.warning(
                    "%s: dropped its last line, which was cut off (the run stopped while writing it)", self.path
                )
            else:
                log.warning("%s line %d: dropped, %s", self.path, number, problem)
        return records

    def keep_epochs_before(self, epoch: int) -> None:
        """Drop records of epochs >= ``epoch`` (they are redone after a resume)."""
        if not self._exists():
            return
        records = [r for r in self.read() if r["epoch"] < epoch]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(strict_json(record) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        self._exists()  # a FIFO there would block the run until something reads it
        with open(self.path, "a") as handle:
            handle.write(strict_json(record) + "\n")
            handle.flush()


def log_to_files(message: str) -> None:
    """Write ``message`` to the run's log files (train.log) only, not to the console."""
    record = logging.LogRecord("ddpo", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


def finite_json(value):
    """``value`` with every NaN or infinity (at any depth) replaced by None: standard JSON can hold it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def strict_json(record: dict) -> str:
    """``record`` as one line of standard JSON: NaN and infinities (at any depth) become null."""
    return json.dumps(finite_json(record), allow_nan=False)


def to_pil(image):
    """A PIL image from a PIL image, an HWC/CHW array or tensor in [0, 1] or uint8."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


CAPTION_LINES = 4  # a caption wraps onto at most this many lines under its tile (the last one ends in "...")


def wrap_caption(caption: str, width: int, lines: int = CAPTION_LINES) -> list[str]:
    """The caption in lines of at most ``width`` characters, broken between words; "..." where it is cut."""
    import textwrap

    return textwrap.wrap(caption, width=max(width, 4), max_lines=lines, placeholder="...") or [""]


def image_grid(images: list, captions: list[str], tile: int = 256, columns: int | None = None):
    """Tiles with their captions underneath (wrapped, not cut), up to 8 per row.

    Not diffusers' ``make_image_grid``: that pastes same-sized images edge to edge with no text, and
    the captions (the prompt of each image) are what this grid is for."""
    from PIL import Image, ImageDraw

    columns = min(columns or 8, len(images))
    rows = math.ceil(len(images) / columns)
    wrapped = [wrap_caption(c, tile // 6) for c in captions]
    line_height = 11
    caption_height = 3 + line_height * max((len(w) for w in wrapped), default=1)
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_height)
        grid.paste(to_pil(image).convert("RGB").resize((tile, tile)), (x, y))
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill="black", spacing=1)
    return grid


class RunTracker:
    """The tracker a run logs to, the same surface for every logger.

    ``log(values, step)`` takes scalars; ``log_images({caption: image or [images]}, step)`` takes
    PIL images, arrays or tensors, so a hook written for wandb (``[PIL image]`` values) also works
    with tensorboard and with no logger. Every call to ``log_images`` also writes a captioned grid
    to ``<run>/images/step_<step>.png``, so images are on disk whatever the logger.
    ``log_epoch_rewards`` logs the epoch's reward histogram and, every ``prompt_table_every``
    epochs (0: never), a per-prompt table. The image hook runs every ``images_every`` epochs (and
    at the last; 0: never, ``images_due``), and a call logs at most ``max_images`` images.
    """

    def __init__(
        self,
        accelerator,
        backend: str,
        run_dir: str,
        prompt_table_every: int = 0,
        images_every: int = 1,
        max_images: int = 16,
    ):
        self.images_every, self.max_images = images_every, max_images
        self.accelerator = accelerator
        self.backend = backend
        self.image_dir = os.path.join(run_dir, "images")
        self.prompt_table_every = prompt_table_every

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        if self.backend != "none":
            self.accelerator.log(values, step=step)

    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        if not self.accelerator.is_main_process:
            return
        flat: list[tuple[str, Any]] = []
        for caption, images in values.items():
            images = images if isinstance(images, (list, tuple)) else [images]
            flat.extend((caption if len(images) == 1 else f"{caption} ({i})", img) for i, img in enumerate(images))
        flat = flat[: self.max_images]
        pils = [to_pil(img) for _, img in flat]
        if self.backend == "wandb":
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({"images": [wandb.Image(p, caption=c) for (c, _), p in zip(flat, pils)]}, step=step)
        elif self.backend == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            # one tag per slot, the captions as text: a caption in the tag (it holds the reward) would
            # make new tags every epoch, and the step slider would have nothing to move through
            for i, pil in enumerate(pils):
                writer.add_image(f"images/{i:02d}", np.asarray(pil.convert("RGB")), step, dataformats="HWC")
            captions = "\n".join(f"- images/{i:02d}: {caption}" for i, (caption, _) in enumerate(flat))
            writer.add_text("images/captions", captions, step)
            writer.flush()
        os.makedirs(self.image_dir, exist_ok=True)
        image_grid(pils, [c for c, _ in flat]).save(os.path.join(self.image_dir, f"step_{step or 0:06d}.png"))

    def images_due(self, epoch: int, num_epochs: int) -> bool:
        """Whether the image hook runs after ``epoch`` (0-based): every ``images_every`` epochs from the first,
        and the last epoch; never with ``images_every`` 0."""
        return self.images_every > 0 and (epoch % self.images_every == 0 or epoch == num_epochs - 1)

    def log_epoch_rewards(self, rewards: np.ndarray, prompts: list[str], step: int, epoch: int) -> None:
        """The reward histogram of the epoch (all processes' samples), and the per-prompt table when due.

        With no logger nothing is written: metrics.jsonl already holds the epoch's mean and std.
        """
        if not self.accelerator.is_main_process or self.backend == "none":
            return
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        table_due = self.prompt_table_every > 0 and epoch % self.prompt_table_every == 0
        rows = per_prompt_rewards(prompts, rewards) if table_due else None
        if self.backend == "wandb":
            import wandb

            values = {"reward": wandb.Histogram(rewards)}
            if rows is not None:
                values["reward_by_prompt"] = wandb.Table(columns=["prompt", "count", "mean", "std"], data=rows)
            self.accelerator.get_tracker("wandb", unwrap=True).log(values, step=step)
        elif self.backend == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_histogram("reward", rewards, step)
            if rows is not None:
                writer.add_text("reward_by_prompt", markdown_table(["prompt", "count", "mean", "std"], rows), step)
            writer.flush()

    def finish(self) -> None:
        if self.backend != "none":
            self.accelerator.end_training()


def per_prompt_rewards(prompts: list[str], rewards: np.ndarray) -> list[list]:
    """``[prompt, count, mean, std]`` for each distinct prompt, sorted by prompt."""
    prompts_arr = np.asarray(prompts, dtype=object)
    rows = []
    for prompt in sorted(set(prompts)):
        values = rewards[prompts_arr == prompt]
        rows.append([prompt, int(values.size), float(values.mean()), float(values.std())])
    return rows


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A markdown table (TensorBoard's text tab renders it); floats with 4 significant digits."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def wandb_run_id(run_dir: str) -> str:
    """The wandb run id of ``run_dir``: made once, kept in ``<run>/wandb/run_id``.

    A restarted or requeued run reads it back, so it continues the same wandb run (resume="allow").
    """
    path = os.path.join(run_dir, "wandb", WANDB_RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            run_id = handle.read().strip()
        if run_id:
            return run_id
    import uuid

    run_id = uuid.uuid4().hex[:12]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        handle.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def log_last_batch_images(image_data, global_step: int, accelerate_logger, size: int = 256) -> None:
    """Default image hook: the last sample batch, ``size`` px, captioned ``prompt | reward``."""
    images, prompts, _, rewards = image_data[-1]
    accelerate_logger.log_images(
        {
            f"{i:02d}: {prompt} | {float(reward):.2f}": [to_pil(image).resize((size, size))]
            for i, (image, prompt, reward) in enumerate(zip(images, prompts, rewards))
        },
        step=global_step,
    )


def plot_reward_curve(records: list[dict], path: str, title: str = "") -> None:
    """reward_mean +- reward_std per epoch, written as a PNG."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.array([r["epoch"] for r in records])
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, mean, marker="o", markersize=3)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward (mean ± std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ImageHook = Callable[[list, int, RunTracker], None]
