"""Serve a reward over HTTP (protocol 1 of ``rewards/remote.py``; README "Remote rewards").

    ddpo-reward-server reward=jpeg_compressibility --port 8765
    ddpo-reward-server --reward aesthetic reward.dtype=bf16 --device cuda
    ddpo-reward-server experiment=tiny_shapes_proxy                 # an experiment's reward
    ddpo-reward-server --target my_module.MyReward threshold=0.5    # your class, with keyword arguments

(in a clone: ``python scripts/reward_server.py`` with the same arguments), then train against it:
``python train.py reward=remote reward.url=http://<host>:8765``.

Hydra overrides compose the reward exactly as ``train.py`` would (``conf/reward/<name>.yaml`` and
its keys); with ``--target`` the class is built with the ``key=value`` arguments instead (values
parsed as YAML; the class must be importable: start the server in its project, or put it on
PYTHONPATH). The model is loaded once; requests are decoded in parallel and scored one at a time.
Each request is logged as one line on stderr; SIGTERM or Ctrl-C stops the server cleanly.

Every resource a client can claim is bounded: connections are served by one event loop (a slow or
idle one holds no thread), each request must arrive within ``--timeout``, bodies are limited by
``--max-body-mb`` and read as they arrive (an announced length reserves nothing), at most
``--max-requests`` /score requests are in progress (more are answered 503 at once, which clients
retry), and images are decoded only if their headers announce at most ``--max-megapixels``. It
listens on 127.0.0.1 by default; with ``$DDPO_REWARD_TOKEN`` set, every request must carry
``Authorization: Bearer <token>`` (``reward=remote`` sends it from the same variable).

Why asyncio's streams and not a maintained server: what a server library would take over here is
the HTTP/1.1 framing of two JSON endpoints (the headers are parsed by ``http.client.parse_headers``),
while the limits above, the part that matters, it would not give. uvicorn has no deadline for a
request to arrive (its keep-alive timeout applies between requests and restarts with every byte, and
an ASGI middleware runs only once the headers are in: Kludex/uvicorn#157), nor a body size limit;
waitress's ``channel_timeout`` is idle time, restarted by every byte too, and it reads a whole body
before the application sees the request, so a request whose body is still arriving could neither
take a ``--max-requests`` slot nor be answered 408. Each limit would be written again around the
library, which none of this project's dependencies brings.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import http.client
import io
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus

from ddpo.errors import ConfigError, DDPOError
from ddpo.rewards.remote import (
    IMAGE_ENCODINGS,
    PROTOCOL,
    TOKEN_ENV,
    ImagesTooLarge,
    decode_images,
    encode_scores,
    is_loopback,
)

SERVER_NAME = "ddpo-reward-server"
HEADER_LIMIT = 64 * 1024  # bytes of a request's line and headers together


def build_reward(overrides: list[str], target: str | None):
    """(reward, its name, its class path) from Hydra overrides, or from ``--target`` and ``key=value`` arguments.

    A class of your own is imported from where the server starts, as ``python -m`` would find it (the current
    directory is looked in last: this project's modules and installed packages come first), or from PYTHONPATH.
    """
    from omegaconf import OmegaConf

    from ddpo.config import _instantiate

    if os.getcwd() not in sys.path:  # neither scripts/reward_server.py nor the console script puts it there
        sys.path.append(os.getcwd())
    if target:
        kwargs = [o.removeprefix("reward.") for o in overrides]
        bad = [o for o in kwargs if "=" not in o or o.startswith(("+", "~"))]
        if bad:
            raise ConfigError(f"with --target, give keyword arguments as key=value, got {bad}")
        node = OmegaConf.merge({"_target_": target}, OmegaConf.from_dotlist(kwargs))
        name = target.rsplit(".", 1)[-1]
    else:
        from hydra import compose, initialize_config_dir

        from ddpo.cli import config_dir
        from ddpo.config import register_configs

        register_configs()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            try:
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            except Exception as exc:  # noqa: BLE001 (hydra raises several types for bad overrides)
                reason = " ".join(str(exc).split("Config search path")[0].split())[:300]
                raise ConfigError(f"cannot compose the reward from {overrides}: {reason}") from None
        name = cfg.hydra.runtime.choices.get("reward", "reward")
        node = cfg.reward
    if node.get("_target_") in ("ddpo.rewards.remote.RemoteReward", "rewards.remote.RemoteReward"):
        raise ConfigError("reward=remote cannot be served: pick the reward this server computes (reward=<name>)")
    return _instantiate(node, f"the reward ({name})"), name, node.get("_target_")


class Refused(Exception):
    """An answer given instead of scoring: status, message, and whether the connection must close
    (always when the body was not read: what follows on it is not a request)."""

    def __init__(self, status: int, message: str, close: bool = False, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers or {}


def parse_request(request, max_pixels: int | None = None) -> tuple:
    """(images tensor, prompts, metadata) of a /score request; ValueError naming what is wrong."""
    if not isinstance(request, dict):
        raise ValueError("the body must be a JSON object")
    if request.get("protocol", PROTOCOL) != PROTOCOL:
        raise ValueError(f"protocol {request.get('protocol')!r}; this server speaks {PROTOCOL}")
    if "images" not in request:
        raise ValueError("no 'images'")
    images = decode_images(request["images"], max_pixels)
    count = images.shape[0]
    prompts = request.get("prompts", [""] * count)
    metadata = request.get("metadata", [{}] * count)
    if not (isinstance(prompts, list) and len(prompts) == count and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"'prompts' must be a list of {count} strings (one per image)")
    if not (isinstance(metadata, list) and len(metadata) == count and all(isinstance(m, dict) for m in metadata)):
        raise ValueError(f"'metadata' must be a list of {count} objects (one per image)")
    return images, prompts, metadata


def content_length(headers) -> int | None:
    """The request's body length (None: no body announced); Refused 400 for anything but one decimal number."""
    if "Transfer-Encoding" in headers:
        raise Refused(400, "Transfer-Encoding is not accepted: send the body with a Content-Length", close=True)
    values = {v.strip() for v in headers.get_all("Content-Length", [])}
    if not values:
        return None
    value = values.pop()
    if values or not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise Refused(400, "Content-Length must be one number of bytes >= 0", close=True)
    return int(value)


def parse_head(head: bytes) -> tuple:
    """(method, path, version, headers) of a request's line and headers; Refused 400/431 if malformed."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise Refused(400, "malformed request line", close=True)
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException as exc:  # too many headers, a line too long
        raise Refused(431, f"malformed headers: {exc}", close=True) from None
    return parts[0][:20], parts[1][:200], parts[2], headers


class Limits:
    """What one client may claim of the server (the command-line options of the same names)."""

    def __init__(self, timeout=60.0, max_body_mb=256.0, max_megapixels=64.0, max_requests=4, max_connections=512):
        self.timeout = float(timeout)
        self.max_body = int(max_body_mb * 2**20)
        self.max_pixels = int(max_megapixels * 2**20)
        self.max_requests = int(max_requests)
        self.max_connections = int(max_connections)


class Workers:
    """Daemon threads that decode and score (a stop does not wait for the request in flight)."""

    def __init__(self, count: int):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self.work, name=f"score-{i}", daemon=True).start()

    def work(self):
        while True:
            loop, future, fn, args = self.jobs.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting coroutine)
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop has closed: the server is stopping
                pass

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((loop, future, fn, args))
        return await future


def _settle(future, result, error):
    if future.done():  # cancelled: the server is stopping
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class RewardService:
    """The reward and what the connections share: one lock, so the model scores one request at a time."""

    def __init__(self, reward, name: str, target: str, device: str, limits: Limits, token: str | None = None):
        self.reward, self.name, self.target, self.device = reward, name, target, device
        self.limits = limits
        self.token = token.encode("utf-8") if token else None
        self.lock = threading.Lock()
        self.requests = 0  # scored
        self.in_progress = 0  # /score requests admitted and not yet answered
        self.connections = 0
        self.workers = Workers(limits.max_requests)

    def describe(self) -> dict:
        return {
            "protocol": PROTOCOL,
            "status": "ok",
            "reward": self.name,
            "target": self.target,
            "device": self.device,
            "image_encodings": list(IMAGE_ENCODINGS),
            "scored_requests": self.requests,
        }

    def score(self, images, prompts, metadata) -> dict:
        import torch

        with self.lock, torch.no_grad():
            output = self.reward(images.to(self.device), prompts, metadata)
            self.requests += 1
        return encode_scores(output, images.shape[0])

    def score_body(self, body: bytes) -> tuple[int, dict, int | None]:
        """(status, answer, image count) of a /score body; runs in a worker thread."""
        try:
            images, prompts, metadata = parse_request(json.loads(body), self.limits.max_pixels)
        except ImagesTooLarge as exc:
            return 413, {"error": f"{exc} (--max-megapixels; send fewer images per request: reward.batch_size)"}, None
        except RecursionError:
            return 400, {"error": "bad request: the JSON nests too deeply"}, None
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return 400, {"error": f"bad request: {exc}"}, None
        try:
            return 200, self.score(images, prompts, metadata), len(prompts)
        except Exception as exc:  # noqa: BLE001 (the reward's failure is the client's answer, the server goes on)
            return 500, {"error": f"the reward failed: {type(exc).__name__}: {exc}"}, len(prompts)

    def authorize(self, headers, close: bool):
        """Refused 401 unless the request carries the token (when one is set), compared in constant time."""
        if self.token is None:
            return
        scheme, _, given = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.token):
            raise Refused(
                401,
                f"a valid token is required: Authorization: Bearer <${TOKEN_ENV} of the server>",
                close=close,
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- the connections (one event loop: a slow or idle client holds no thread) ----------------
    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else "-"
        self.connections += 1
        try:
            if self.connections > self.limits.max_connections:
                busy = {"error": f"busy: {self.limits.max_connections} connections open (--max-connections)"}
                await self.send(
                    writer, client, "-", "-", 503, busy, time.perf_counter(), True, None, {"Retry-After": "1"}
                )
                return
            first = True
            while await self.serve_request(reader, writer, client, first):
                first = False
        except (OSError, asyncio.IncompleteReadError):  # the client went away
            pass
        finally:
            self.connections -= 1
            writer.close()  # after the answer still buffered is sent; cut it if the client does not take it
            asyncio.get_running_loop().call_later(self.limits.timeout, writer.transport.abort)

    async def serve_request(self, reader, writer, client: str, first: bool) -> bool:
        """Read one request within --timeout and answer it; whether the connection stays open."""
        timeout = self.limits.timeout
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:  # closed by the client (between requests: normal)
            if exc.partial.strip():
                self.log(f"{client} closed the connection in the middle of a request")
            return False
        except asyncio.LimitOverrunError:
            message = f"the request line and headers exceed {HEADER_LIMIT // 1024} KiB"
            await self.send(writer, client, "-", "-", 431, {"error": message}, time.perf_counter(), True)
            return False
        except TimeoutError:
            if first:  # an idle keep-alive connection is closed without a word
                self.log(f"{client} sent no complete request within {timeout:g} s (--timeout): closed")
            return False
        started = time.perf_counter()
        method, path, close, images, extra = "-", "-", True, None, None
        try:
            method, path, version, headers = parse_head(head)
            close = version == "HTTP/1.0" or "close" in (headers.get("Connection") or "").lower()
            status, payload, images, close_after = await self.respond(method, path, headers, reader, writer)
            close = close or close_after
        except Refused as refused:
            status, payload, extra = refused.status, {"error": refused.message}, refused.headers
            close = close or refused.close
        except Exception as exc:  # noqa: BLE001 (a fault of this server's: one line, and it goes on)
            status, payload, close = 500, {"error": f"server error: {type(exc).__name__}: {exc}"}, True
        delivered = await self.send(writer, client, method, path, status, payload, started, close, images, extra)
        return delivered and not close

    async def respond(self, method: str, path: str, headers, reader, writer):
        """(status, answer, image count, close) of one request; Refused for an error answer."""
        length = content_length(headers)
        unread = bool(length)  # a body left unread on the connection: close it after the answer
        self.authorize(headers, close=unread)
        endpoint = path.split("?")[0].rstrip("/")
        if method == "GET" and endpoint == "/health":
            return 200, self.describe(), None, unread
        if method == "POST" and endpoint == "/score":
            return (*await self.admit_score(length, headers, reader, writer), False)
        if endpoint in ("/health", "/score"):
            allowed = "GET" if endpoint == "/health" else "POST"
            raise Refused(405, f"{endpoint} takes {allowed}", close=unread, headers={"Allow": allowed})
        raise Refused(404, f"no such endpoint {path} (GET /health, POST /score)", close=unread)

    async def admit_score(self, length: int | None, headers, reader, writer):
        """Read and score one /score body, if there is room for it; (status, answer, image count)."""
        limits = self.limits
        if length is None:
            raise Refused(400, "a Content-Length header is required", close=True)
        if length > limits.max_body:
            raise Refused(
                413,
                f"request of {length} bytes exceeds --max-body-mb {limits.max_body / 2**20:g}: "
                "send fewer images per request (reward.batch_size)",
                close=True,
            )
        if self.in_progress >= limits.max_requests:
            raise Refused(
                503,
                f"busy: {limits.max_requests} requests in progress (--max-requests)",
                close=True,
                headers={"Retry-After": "1"},
            )
        self.in_progress += 1
        try:
            if (headers.get("Expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:  # the body is read as it arrives: its announced length reserves nothing
                body = await asyncio.wait_for(reader.readexactly(length), limits.timeout)
            except TimeoutError:
                raise Refused(
                    408, f"the body did not arrive within {limits.timeout:g} s (--timeout)", close=True
                ) from None
            except asyncio.IncompleteReadError:
                raise Refused(400, "the connection closed before the body arrived", close=True) from None
            return await self.workers.run(self.score_body, body)
        finally:
            self.in_progress -= 1

    async def send(self, writer, client, method, path, status, payload, started, close, images=None, headers=None):
        """Write one JSON answer within --timeout and log its line; whether it was delivered."""
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Server: {SERVER_NAME}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
            *(["Connection: close"] if close else []),
        ]
        error = payload.get("error")
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), self.limits.timeout)
            delivered = True
        except (TimeoutError, OSError) as exc:  # the client went away or does not read
            delivered = False
            error = f"answer not delivered: {type(exc).__name__}" + (f"; {error}" if error else "")
        what = f" {images} image(s)" if images is not None else ""
        self.log(
            f"{client} {method} {path} {status}{what} {time.perf_counter() - started:.3f}s"
            + (f" ({error})" if error else "")
        )
        return delivered

    def log(self, line: str):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


async def serve(service: RewardService, host: str, port: int) -> None:
    """Listen until SIGTERM or Ctrl-C; the ready line (its URL last) goes to stdout."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server = await asyncio.start_server(service.serve_connection, sock=listening, limit=HEADER_LIMIT)
    host, port = listening.getsockname()[:2]
    if service.token is None and not is_loopback(host):
        print(
            f"warning: listening on {host} without a token: anyone who reaches port {port} can use the reward "
            f"(set ${TOKEN_ENV} on the server and the trainer)",
            file=sys.stderr,
            flush=True,
        )
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    required = ", token required" if service.token is not None else ""
    print(
        f"serving reward {service.name} ({service.target}) on {service.device}, protocol {PROTOCOL}{required}, "
        f"at http://{shown}:{port}",
        flush=True,
    )
    await stop.wait()
    server.close()  # the connections still open are cancelled when the loop ends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides (reward=<name>, reward.<key>=...), or with --target the class's key=value arguments",
    )
    parser.add_argument(
        "--reward", help="the reward option (conf/reward/<name>.yaml); same as the override reward=<name>"
    )
    parser.add_argument(
        "--target", help="a reward class to serve instead (module.Class), built with the key=value arguments"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, with ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port (default 8765; 0 = any free port, printed when ready)"
    )
    parser.add_argument(
        "--device", default=None, help="device the reward scores on (default cuda if available, else cpu)"
    )
    defaults = Limits()
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help=f"seconds a client may take to send one request, and again to take its answer (default {defaults.timeout:g})",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=defaults.max_body / 2**20,
        help=f"largest request accepted, in MiB (default {defaults.max_body / 2**20:g})",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=defaults.max_pixels / 2**20,
        help="pixels of one request's images together, in units of 2**20, checked in the PNG headers before "
        f"decoding (default {defaults.max_pixels / 2**20:g}: e.g. 64 images of 1024x1024)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=defaults.max_requests,
        help="/score requests in progress at once (read, decoded, waiting or scored); more are answered 503 "
        f"at once, which clients retry (default {defaults.max_requests})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help=f"connections open at once; more are answered 503 (default {defaults.max_connections})",
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.reward:
        if args.target:
            parser.error("give --reward or --target, not both")
        overrides.insert(0, f"reward={args.reward}")

    try:
        limits = Limits(args.timeout, args.max_body_mb, args.max_megapixels, args.max_requests, args.max_connections)
        for option, value in [
            ("--timeout", limits.timeout),
            ("--max-body-mb", limits.max_body),
            ("--max-megapixels", limits.max_pixels),
            ("--max-requests", limits.max_requests),
            ("--max-connections", limits.max_connections),
        ]:
            if not value > 0 or value == float("inf"):
                raise ConfigError(
                    f"{option} must be a positive number, got {getattr(args, option[2:].replace('-', '_'))}"
                )
        token = os.environ.get(TOKEN_ENV)
        if token is not None:
            token = token.strip()
            if not token or any(c in token for c in "\r\n\0"):
                raise ConfigError(f"${TOKEN_ENV} is set but empty or not one line: unset it or give the token")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reward, name, target = build_reward(overrides, args.target)
        if hasattr(reward, "to"):
            reward.to(device)
        service = RewardService(reward, name, target, device, limits, token)
        asyncio.run(serve(service, args.host, args.port))
    except DDPOError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the cause's
        return 1
    print(f"stopped after {service.requests} scored request(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
