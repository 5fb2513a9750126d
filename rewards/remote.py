"""A reward scored by an HTTP server: ``reward=remote reward.url=http://host:port``.

The wire format (protocol 1, documented in the README's "Remote rewards" section) lives here, both
sides of it: the client (``RemoteReward``) and the functions ``scripts/reward_server.py`` serves with
(``decode_images``, ``encode_scores``), so that the two cannot drift apart.

    GET  /health -> {"protocol": 1, "status": "ok", "reward": name, "target": class, "image_encodings": [...]}
    POST /score  {"protocol": 1, "images": {...}, "prompts": [...], "metadata": [...]}
              -> {"protocol": 1, "rewards": [...], "info": {name: [...]}}

Images travel as 8-bit RGB, rounded exactly as ``rewards.base.to_uint8_hwc`` rounds them (what the
JPEG rewards and PIL-based preprocessing see locally): PNG files (lossless) or one raw uint8 array.
Any failure ends the run with one line (``RemoteRewardError``) naming the URL.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import ipaddress
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
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


class _Try:
    """One try of one request: when it must have ended, and the sockets it opened (to cut them on ``close``)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.sockets: list = []


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads an answer through it: every read waits at most until the deadline,
    so a server that answers one byte at a time cannot stretch a request past ``reward.timeout``."""

    def __init__(self, sock, raw, deadline: float):
        self._sock, self._raw, self._deadline = sock, raw, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(remaining)
        return self._raw.readinto(buffer)

    def close(self):
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp.detach(), deadline))


class _DeadlineConnection:
    """Mixed into http.client's connections: connecting waits at most until the try's deadline (urllib
    passes the remaining time as the timeout), sending too (``sendall`` bounds the whole body), and the
    answer is read through a ``_DeadlineReader``."""

    def __init__(self, *args, attempt: _Try, **kwargs):
        super().__init__(*args, **kwargs)
        self._attempt = attempt
        self.response_class = functools.partial(_DeadlineResponse, deadline=attempt.deadline)

    def connect(self):
        super().connect()
        self._attempt.sockets.append(self.sock)
        remaining = self._attempt.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(remaining)  # sending the request: sendall is bounded as a whole


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, attempt=req.attempt), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, attempt=req.attempt), req, context=self._context)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Every 3xx answer stays an HTTPError: reward.headers (a token) must never reach another host."""

    def redirect_request(self, *args, **kwargs):
        return None


class RemoteReward(Reward):
    """Posts each image batch to a reward server (``scripts/reward_server.py`` or your own) and
    returns its rewards and info. Runs in the trainer's reward thread like any local reward.

    Args:
        url: the server's base URL (``/health`` and ``/score`` are appended).
        timeout: seconds one request may take in all (connecting, sending, and the whole answer).
        retries: further tries after a failed one (connection refused or reset, timeout, HTTP 408,
            429, 502, 503, 504); a malformed answer, a redirect or another HTTP error fails at once.
        backoff: seconds before the first retry, doubled before each next one.
        batch_size: images per request (a bigger batch is sent in chunks); null = the whole batch.
        image_encoding: ``png`` (lossless, smaller) or ``raw`` (uint8 array, no encoding cost).
        headers: extra HTTP headers of every request (they are logged with the config: no secrets).
        token_env: an environment variable whose value, if set, is sent as ``Authorization: Bearer``
            (the reference server checks ``$DDPO_REWARD_TOKEN``); null = none.
        check_health: ask ``/health`` when the reward is built, so a down server stops the run
            before anything is sampled.

    Redirects are not followed (the headers and the token go to ``url`` only). ``close()`` abandons
    the request in flight and any retry, for a trainer that stops while a batch is being scored.
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
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"reward.batch_size must be an integer >= 1 or null, got {batch_size!r}")
        if image_encoding not in IMAGE_ENCODINGS:
            raise ConfigError(f"reward.image_encoding must be one of {list(IMAGE_ENCODINGS)}, got {image_encoding!r}")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
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
        self._tries: set[_Try] = set()
        self._tries_lock = threading.Lock()
        # environment proxies (http_proxy) are for leaving the machine: never route localhost through them
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers, _NoRedirects(), _HTTPHandler(), _HTTPSHandler())
        self.server: dict = self.health() if check_health else {}

    def close(self):
        """Abandon: the request in flight ends now (its sockets are shut) and no retry follows."""
        self._closed.set()
        with self._tries_lock:
            sockets = [sock for attempt in self._tries for sock in attempt.sockets]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked on it
            except OSError:
                pass  # already closed

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

        Each try ends within ``timeout`` seconds (connect, send, whole answer), so the whole call ends
        within ``tries * timeout`` plus the backoff, or at once after ``close()``.
        """
        headers = {"Accept": "application/json", **self.headers}
        if data is not None:
            headers["Content-Type"] = "application/json"
        tries = self.retries + 1
        started = time.monotonic()
        last = ""
        for attempt in range(tries):
            if self._closed.wait(self.backoff * 2 ** (attempt - 1) if attempt else 0):
                raise RemoteRewardError(f"reward server {url}: request abandoned (the reward was closed)")
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            request.attempt = _Try(time.monotonic() + self.timeout)
            with self._tries_lock:
                self._tries.add(request.attempt)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = _read_answer(response, url)
            except urllib.error.HTTPError as error:
                with error:
                    if 300 <= error.code < 400:
                        location = _one_line(error.headers.get("Location") or "nowhere")
                        raise RemoteRewardError(
                            f"reward server {url} redirected (HTTP {error.code}) to {location!r}; redirects are "
                            "not followed (reward.headers go to reward.url only): set reward.url to the server itself"
                        ) from None
                    detail = _server_error(error)
                if error.code not in RETRY_STATUSES:
                    raise RemoteRewardError(
                        f"reward server {url} refused the request: HTTP {error.code}: {detail}"
                    ) from None
                last = f"HTTP {error.code}: {detail}"
            except (OSError, ValueError, EOFError, http.client.HTTPException) as error:
                # refused, reset, timed out, a garbled status line, a cut-off answer
                reason = error.reason if isinstance(error, urllib.error.URLError) else error
                if isinstance(reason, TimeoutError):
                    last = f"timed out: no complete answer within the {self.timeout:g} s deadline (reward.timeout)"
                else:
                    last = _one_line(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)
            else:
                try:
                    return json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise RemoteRewardError(
                        f"reward server {url} answered malformed data: not JSON: {_excerpt(raw)}"
                    ) from None
            finally:
                with self._tries_lock:
                    self._tries.discard(request.attempt)
            if self._closed.is_set():
                raise RemoteRewardError(f"reward server {url}: request abandoned (the reward was closed)")
        raise RemoteRewardError(
            f"reward server {url} did not answer after {tries} tr{'y' if tries == 1 else 'ies'} "
            f"in {time.monotonic() - started:.1f} s (last: {last}); check that it runs (reward.url, reward.timeout)"
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


def _read_answer(response, url: str) -> bytes:
    """The body of an answer, in chunks (each read bounded by the try's deadline), at most MAX_ANSWER_BYTES."""
    too_big = RemoteRewardError(
        f"reward server {url} answered more than {MAX_ANSWER_BYTES // 2**20} MiB: not a reward server's answer"
    )
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise too_big
    chunks, size = [], 0
    while chunk := response.read(2**20):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _server_error(error: urllib.error.HTTPError) -> str:
    """The ``error`` field of a server's JSON error answer, or the start of its body."""
    try:
        body = error.read(64 * 1024)  # only for the message
    except Exception:  # noqa: BLE001 (the body is only for the message)
        body = b""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        message = None
    return _one_line(str(message)) if message else _excerpt(body) if body else str(error.reason)


def _excerpt(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else json.dumps(value, default=str)[: EXCERPT + 3]
    return repr(_one_line(text)) if text.strip() else "an empty answer"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 3] + "..."
