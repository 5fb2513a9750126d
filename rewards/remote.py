"""A reward scored by an HTTP server: ``reward=remote reward.url=http://host:port``.

The wire format (protocol 1, documented in the README's "Remote rewards" section) lives here, both
sides of it: the client (``RemoteReward``) and the functions the server (``ddpo-reward-server``, in a clone
``scripts/reward_server.py``; its code is ``ddpo/tools/reward_server.py``) serves with (``decode_images``,
``encode_scores``), so that the two cannot drift apart.

    GET  /health -> {"protocol": 1, "status": "ok", "reward": name, "target": class, "image_encodings": [...]}
    POST /score  {"protocol": 1, "images": {...}, "prompts": [...], "metadata": [...]}
              -> {"protocol": 1, "rewards": [...], "info": {name: [...]}}

Images travel as 8-bit RGB, rounded exactly as ``rewards.base.to_uint8_hwc`` rounds them (what the
JPEG rewards and PIL-based preprocessing see locally): PNG files (lossless) or one raw uint8 array.
Any failure ends the run with one line (``RemoteRewardError``) naming the URL.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import io
import ipaddress
import json
import math
import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ddpo.errors import ConfigError, DDPOError

from .base import Reward, check_images, to_uint8_hwc

PROTOCOL = 1
IMAGE_ENCODINGS = ("png", "raw")
RETRY_STATUSES = (408, 429, 502, 503, 504)  # a busy or restarting server (or a proxy in front of it)
EXCERPT = 120  # characters of a server's answer quoted in an error line
MAX_ANSWER_BYTES = 64 * 2**20  # a /score answer is a few numbers per image: more is not a reward server
TOKEN_ENV = "DDPO_REWARD_TOKEN"  # the bearer token both sides read by default (reward.token_env)


class RemoteRewardError(DDPOError):
    """The reward server cannot be reached, refused a request, or answered something unusable."""


# -- the wire format ------------------------------------------------------------------------------
def encode_images(pixels, encoding: str = "png") -> dict:
    """uint8 (B, H, W, 3) numpy pixels -> the request's ``images`` object."""
    if encoding == "raw":
        return {
            "encoding": "raw",
            "dtype": "uint8",
            "shape": list(pixels.shape),
            "data": base64.b64encode(pixels.tobytes()).decode("ascii"),
        }
    from PIL import Image

    files = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is the fastest
        files.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"encoding": "png", "data": files}


class ImagesTooLarge(ValueError):
    """A request's images hold more pixels than the server decodes (a decompression bomb, or a batch too big)."""


def decode_images(payload: Any, max_pixels: int | None = None):
    """The request's ``images`` object -> float32 (B, 3, H, W) tensor in [0, 1]; ValueError if malformed.

    ``max_pixels`` bounds B·H·W before anything is decoded (the PNG headers and the raw shape announce
    it), so a small file that inflates to gigabytes is refused with ``ImagesTooLarge`` instead.
    """
    import numpy as np
    import torch

    if not isinstance(payload, Mapping):
        raise ValueError("'images' must be an object with 'encoding' and 'data'")
    encoding = payload.get("encoding")
    data = payload.get("data")
    if encoding == "raw":
        shape = payload.get("shape")
        if payload.get("dtype", "uint8") != "uint8":
            raise ValueError(f"raw images must have dtype uint8, got {payload.get('dtype')!r}")
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and shape[3] == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise ValueError(f"raw images need 'shape' [B, H, W, 3], got {shape!r}")
        _check_pixels(math.prod(shape[:3]), shape[0], max_pixels)
        raw = _b64(data, "images.data")
        if len(raw) != math.prod(shape):
            raise ValueError(f"raw images: {len(raw)} bytes for shape {shape} ({math.prod(shape)} expected)")
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()  # writable, for torch
    elif encoding == "png":
        from PIL import Image

        if not isinstance(data, list) or not data:
            raise ValueError("png images need 'data': a non-empty list of base64 PNG files")
        opened = []
        try:
            for i, item in enumerate(data):  # headers only: Image.open reads the size, not the pixels
                try:
                    opened.append(Image.open(io.BytesIO(_b64(item, f"images.data[{i}]")), formats=["PNG"]))
                except Image.DecompressionBombError as exc:
                    raise ImagesTooLarge(f"images.data[{i}]: {exc}") from None
                except (OSError, SyntaxError) as exc:  # PIL: not a PNG file
                    raise ValueError(f"images.data[{i}] is not a readable PNG file ({exc})") from None
            sizes = {image.size for image in opened}
            if len(sizes) != 1:
                raise ValueError(f"images differ in size: {sorted((h, w) for w, h in sizes)}")
            width, height = sizes.pop()
            _check_pixels(width * height * len(opened), len(opened), max_pixels)
            arrays = []
            for i, image in enumerate(opened):
                try:
                    arrays.append(np.asarray(image.convert("RGB")))
                except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
                    raise ValueError(f"images.data[{i}] is not a readable PNG file ({exc})") from None
        finally:
            for image in opened:
                image.close()
        pixels = np.stack(arrays)
    else:
        raise ValueError(f"images.encoding must be one of {list(IMAGE_ENCODINGS)}, got {encoding!r}")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _check_pixels(pixels: int, count: int, max_pixels: int | None):
    if max_pixels is not None and pixels > max_pixels:
        raise ImagesTooLarge(f"{count} image(s) of {pixels} pixels in all exceed the limit of {max_pixels} pixels")


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None


def json_safe(value: Any) -> Any:
    """Metadata as strict JSON values: tuples become lists, non-finite floats null, unknown objects strings."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return json_safe(value.tolist())
    return str(value)


def _number_list(values) -> list:
    """Float32 values -> JSON numbers, NaN/inf as null (strict JSON has no NaN)."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def encode_scores(output: Any, batch_size: int) -> dict:
    """A reward's ``(rewards, info)`` -> the ``/score`` answer; ValueError if it is not one number per image.

    Info entries without one value per image are dropped, as the trainer drops them for a local reward.
    """
    from .base import as_reward_tensor

    if not (isinstance(output, tuple) and len(output) == 2):
        raise ValueError(f"the reward must return (rewards, info), got {type(output).__name__}")
    rewards, info = output
    answer = {"protocol": PROTOCOL, "rewards": _number_list(as_reward_tensor(rewards, batch_size)), "info": {}}
    for key, value in (info or {}).items():
        try:
            answer["info"][str(key)] = _number_list(as_reward_tensor(value, batch_size, f"info {key!r}"))
        except (TypeError, ValueError, RuntimeError):
            continue
    return answer


# -- the client -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _run_abandonable(coroutine_fn, running: set, lock: threading.Lock, closed: threading.Event):
    """Run ``coroutine_fn()`` to its end on an event loop of its own; ``close()`` of the reward cancels it
    from any thread (the task is in ``running`` while it runs). In a thread that already runs an event
    loop (a notebook), the loop gets a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="remote-reward") as pool:
            return pool.submit(_run_abandonable, coroutine_fn, running, lock, closed).result()
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(coroutine_fn())
        entry = (loop, task)
        with lock:
            running.add(entry)
        if closed.is_set():
            task.cancel()
        try:
            return loop.run_until_complete(task)
        finally:
            with lock:
                running.discard(entry)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())  # a response's reader cut off by a cancel
        finally:
            loop.close()


def _transport_reason(error: BaseException) -> str:
    """One line for a failed connection or answer, naming the innermost OS error when there is one (anyio
    reports a refused connection as "All connection attempts failed", raised from the ConnectionRefusedError)."""
    cause, seen = error, set()
    while id(cause) not in seen and (cause.__cause__ or cause.__context__) is not None:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause is not error and cause.errno:
        return f"{type(error).__name__}: {type(cause).__name__}: {os.strerror(cause.errno)}"
    text = str(error)
    return _one_line(f"{type(error).__name__}: {text}" if text else type(error).__name__)


class _TooBig(Exception):
    """An answer of more than MAX_ANSWER_BYTES."""


async def _fetch(client, url: str, data: bytes | None, headers: dict) -> tuple[int, str, Any, bytes]:
    """(status, reason phrase, headers, body) of one request, the body read in chunks: a 2xx body of at most
    MAX_ANSWER_BYTES (``_TooBig`` otherwise), of any other answer the first 64 KiB (only for the message)."""
    async with client.stream("GET" if data is None else "POST", url, content=data, headers=headers) as response:
        limit = MAX_ANSWER_BYTES if 200 <= response.status_code < 300 else 64 * 1024
        declared = response.headers.get("Content-Length", "")
        if limit == MAX_ANSWER_BYTES and declared.isdigit() and int(declared) > limit:
            raise _TooBig
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                if limit == MAX_ANSWER_BYTES:
                    raise _TooBig
                break
        return response.status_code, response.reason_phrase, response.headers, b"".join(chunks)[:limit]


class RemoteReward(Reward):
    """Posts each image batch to a reward server (``ddpo-reward-server`` or your own) and
    returns its rewards and info. Runs in the trainer's reward thread like any local reward.

    Args:
        url: the server's base URL (``/health`` and ``/score`` are appended).
        timeout: seconds one try of a request may take in all (connecting, sending, and the whole answer).
        retries: further tries after a failed one (connection refused or reset, timeout, HTTP 408,
            429, 502, 503, 504); a malformed answer, a redirect or another HTTP error fails at once.
        backoff: seconds before the first retry, doubled before each next one.
        deadline: seconds one request may take with all its tries and backoff (a try gets what is
            left, if less than ``timeout``; no retry starts after it); null = no bound beyond
            ``(retries + 1) * timeout`` plus the backoff.
        batch_size: images per request (a bigger batch is sent in chunks); null = the whole batch.
        image_encoding: ``png`` (lossless, smaller) or ``raw`` (uint8 array, no encoding cost).
        headers: extra HTTP headers of every request (they are logged with the config: no secrets).
        token_env: an environment variable whose value, if set, is sent as ``Authorization: Bearer``
            (the reference server checks ``$DDPO_REWARD_TOKEN``); null = none.
        check_health: ask ``/health`` when the reward is built, so a down server stops the run
            before anything is sampled.

    Redirects are not followed (the headers and the token go to ``url`` only). ``close()`` abandons
    the request in flight and any retry, for a trainer that stops while a batch is being scored.

    HTTP is httpx2's (the client huggingface_hub uses); its per-operation timeouts cannot bound a whole
    answer, so each request runs as an asyncio task whose timeout (or ``close()``) cancels it. The retry
    loop is this class's: httpx2 retries failed connections only, not a busy server's 503.
    """

    name = "remote"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8765",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int | None = None,
        image_encoding: str = "png",
        headers: Mapping | None = None,
        token_env: str | None = TOKEN_ENV,
        check_health: bool = True,
        deadline: float | None = None,
    ):
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"reward.url must be an http(s) URL such as http://127.0.0.1:8765, got {url!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"reward.timeout must be a number of seconds > 0, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ConfigError(f"reward.retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and math.isfinite(backoff) and backoff >= 0):
            raise ConfigError(f"reward.backoff must be a number of seconds >= 0, got {backoff!r}")
        if deadline is not None and not (
            isinstance(deadline, (int, float)) and math.isfinite(deadline) and deadline > 0
        ):
            raise ConfigError(f"reward.deadline must be a number of seconds > 0 or null, got {deadline!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"reward.batch_size must be an integer >= 1 or null, got {batch_size!r}")
        if image_encoding not in IMAGE_ENCODINGS:
            raise ConfigError(f"reward.image_encoding must be one of {list(IMAGE_ENCODINGS)}, got {image_encoding!r}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.deadline = None if deadline is None else float(deadline)
        self.batch_size = batch_size
        self.image_encoding = image_encoding
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        bad = [k for k, v in self.headers.items() if any(c in k + v for c in "\r\n\0")]
        if bad:
            raise ConfigError(f"reward.headers {bad} hold a line break: one line per header value")
        token = os.environ.get(token_env) if token_env else None
        if token is not None and not any(k.lower() == "authorization" for k in self.headers):
            if not token.strip() or any(c in token for c in "\r\n\0"):
                raise ConfigError(
                    f"${token_env} (reward.token_env) is set but empty or not one line: unset it or fix it"
                )
            self.headers["Authorization"] = f"Bearer {token.strip()}"
        self._closed = threading.Event()
        self._running: set = set()  # (event loop, task) of each request in flight
        self._lock = threading.Lock()
        # environment proxies (http_proxy) are for leaving the machine: never route localhost through them
        self._trust_env = not is_loopback(parsed.hostname)
        self.server: dict = self.health() if check_health else {}

    def close(self):
        """Abandon: the request in flight ends now (its task is cancelled) and no retry follows."""
        self._closed.set()
        with self._lock:
            running = list(self._running)
        for loop, task in running:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop has closed: that request has just ended
                pass

    def health(self) -> dict:
        """The server's ``/health`` answer; RemoteRewardError if it is down or speaks another protocol."""
        url = self.url + "/health"
        answer = self._request(url, None)
        if not isinstance(answer, dict):
            raise RemoteRewardError(f"reward server {url} answered malformed data: {_excerpt(answer)}")
        if answer.get("protocol") != PROTOCOL:
            raise RemoteRewardError(
                f"reward server {url} speaks protocol {answer.get('protocol')!r}; this client speaks {PROTOCOL}"
            )
        return answer

    def __call__(self, images, prompts, metadata):
        import torch

        check_images(images)
        count = images.shape[0]
        prompts = list(prompts)
        metadata = list(metadata) if metadata is not None else [{}] * count
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(f"{count} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        pixels = to_uint8_hwc(images)
        step = self.batch_size or count
        rewards, infos = [], []
        for start in range(0, count, step):
            stop = min(start + step, count)
            body = {
                "protocol": PROTOCOL,
                "images": encode_images(pixels[start:stop], self.image_encoding),
                "prompts": [str(p) for p in prompts[start:stop]],
                "metadata": json_safe(metadata[start:stop]),
            }
            chunk_rewards, chunk_info = self._score(body, stop - start)
            rewards.append(chunk_rewards)
            infos.append(chunk_info)
        # an info entry every chunk has (the trainer keeps the entries every sampling batch has, likewise)
        keys = [k for k in infos[0] if all(k in info for info in infos)]
        info = {k: torch.cat([i[k] for i in infos]) for k in keys}
        return torch.cat(rewards), info

    def _score(self, body: dict, count: int):
        """POST one chunk to /score and check the answer: ``count`` finite rewards, info lists of ``count``."""
        import torch

        url = self.url + "/score"
        answer = self._request(url, json.dumps(body, allow_nan=False).encode("utf-8"))

        def malformed(what: str):
            return RemoteRewardError(f"reward server {url} answered malformed data: {what}")

        if not isinstance(answer, dict):
            raise malformed(f"expected a JSON object, got {_excerpt(answer)}")
        if "rewards" not in answer:
            raise malformed(f"no 'rewards' key (keys: {sorted(answer)[:10]})")
        if answer.get("protocol", PROTOCOL) != PROTOCOL:
            raise malformed(f"protocol {answer.get('protocol')!r}; this client speaks {PROTOCOL}")
        rewards = _numbers(answer["rewards"], count)
        if isinstance(rewards, str):
            raise malformed(f"'rewards' {rewards}")
        bad = sum(not math.isfinite(v) for v in rewards)
        if bad:
            raise malformed(f"{bad} non-finite reward(s) (NaN, inf or null) for {count} images")
        info_in = answer.get("info") or {}
        if not isinstance(info_in, dict):
            raise malformed(f"'info' must be an object of per-image lists, got {_excerpt(info_in)}")
        info = {}
        for key, values in info_in.items():
            values = _numbers(values, count)
            if isinstance(values, str):
                raise malformed(f"info[{key!r}] {values}")
            info[str(key)] = torch.tensor(values, dtype=torch.float32)  # NaN (null): "does not apply"
        return torch.tensor(rewards, dtype=torch.float32), info

    def _request(self, url: str, data: bytes | None) -> Any:
        """GET (``data`` None) or POST ``url`` with bounded retries; the parsed JSON answer.

        Each try ends within ``timeout`` seconds (connect, send, whole answer) and the whole request within
        ``deadline`` seconds when one is set (else ``tries * timeout`` plus the backoff), or at once after
        ``close()``: the tries run as asyncio tasks, and a task's timeout or cancellation ends its request
        wherever it waits (httpx2's own timeouts bound each socket operation only, so a server that answers
        a byte at a time would stretch them).
        """
        try:
            return _run_abandonable(
                functools.partial(self._request_with_retries, url, data), self._running, self._lock, self._closed
            )
        except asyncio.CancelledError:
            raise RemoteRewardError(f"reward server {url}: request abandoned (the reward was closed)") from None

    async def _request_with_retries(self, url: str, data: bytes | None) -> Any:
        import httpx2

        headers = {"Accept": "application/json", "Accept-Encoding": "identity", **self.headers}
        if data is not None:
            headers["Content-Type"] = "application/json"
        tries = self.retries + 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = math.inf if self.deadline is None else started + self.deadline
        last, tried = "", 0
        # the retries are this loop's: httpx2's transport retries failed connections only, not HTTP 503 (busy)
        async with httpx2.AsyncClient(follow_redirects=False, trust_env=self._trust_env, timeout=None) as client:
            for attempt in range(tries):
                if attempt:
                    pause = self.backoff * 2 ** (attempt - 1)
                    if loop.time() + pause >= end:
                        break  # no time left for another try
                    await asyncio.sleep(pause)
                budget = min(self.timeout, end - loop.time())
                if budget <= 0:
                    break
                tried += 1
                try:
                    async with asyncio.timeout(budget):
                        status, reason, answer_headers, raw = await _fetch(client, url, data, headers)
                except TimeoutError:
                    last = (
                        f"timed out: no complete answer within the {budget:g} s deadline (reward.timeout)"
                        if budget == self.timeout
                        else f"timed out: no complete answer in the {budget:.1f} s left of reward.deadline"
                    )
                    continue
                except (httpx2.TransportError, OSError, ValueError) as error:  # refused, reset, garbled, cut off
                    last = _transport_reason(error)
                    continue
                except _TooBig:
                    raise RemoteRewardError(
                        f"reward server {url} answered more than {MAX_ANSWER_BYTES // 2**20} MiB: "
                        "not a reward server's answer"
                    ) from None
                if 300 <= status < 400:
                    location = _one_line(answer_headers.get("Location") or "nowhere")
                    raise RemoteRewardError(
                        f"reward server {url} redirected (HTTP {status}) to {location!r}; redirects are "
                        "not followed (reward.headers go to reward.url only): set reward.url to the server itself"
                    )
                if 200 <= status < 300:
                    try:
                        return json.loads(raw)
                    except (ValueError, UnicodeDecodeError):
                        raise RemoteRewardError(
                            f"reward server {url} answered malformed data: not JSON: {_excerpt(raw)}"
                        ) from None
                detail = _server_error(raw, reason)
                if status not in RETRY_STATUSES:
                    raise RemoteRewardError(f"reward server {url} refused the request: HTTP {status}: {detail}")
                last = f"HTTP {status}: {detail}"
        elapsed = loop.time() - started
        if tried < tries:
            raise RemoteRewardError(
                f"reward server {url} did not answer within the {self.deadline:g} s deadline (reward.deadline) "
                f"after {tried} tr{'y' if tried == 1 else 'ies'} (last: {last}); check that it runs (reward.url)"
            )
        raise RemoteRewardError(
            f"reward server {url} did not answer after {tries} tr{'y' if tries == 1 else 'ies'} "
            f"in {elapsed:.1f} s (last: {last}); check that it runs (reward.url, reward.timeout)"
        )

    def __repr__(self) -> str:
        served = self.server.get("reward")
        return f"RemoteReward(url={self.url!r}" + (f", serving {served!r})" if served else ")")


def _numbers(values: Any, count: int) -> list[float] | str:
    """A JSON list of ``count`` numbers (null = NaN) as floats, or a string saying what is wrong with it."""
    if not isinstance(values, list):
        return f"must be a list of {count} numbers, got {_excerpt(values)}"
    if len(values) != count:
        return f"has {len(values)} values for {count} images"
    out = []
    for value in values:
        if value is None:
            out.append(math.nan)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            return f"holds a non-number: {_excerpt(value)}"
    return out


def _server_error(body: bytes, reason: str) -> str:
    """The ``error`` field of a server's JSON error answer, or the start of its body, or the reason phrase."""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        message = None
    return _one_line(str(message)) if message else _excerpt(body) if body else reason


def _excerpt(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else json.dumps(value, default=str)[: EXCERPT + 3]
    return repr(_one_line(text)) if text.strip() else "an empty answer"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 3] + "..."
