"""Serve a reward over HTTP (protocol 1 of ``rewards/remote.py``; README "Remote rewards").

    python scripts/reward_server.py reward=jpeg_compressibility --port 8765
    python scripts/reward_server.py --reward aesthetic reward.dtype=bf16 --device cuda
    python scripts/reward_server.py experiment=tiny_shapes_proxy                 # an experiment's reward
    python scripts/reward_server.py --target my_module.MyReward threshold=0.5    # your class, with keyword arguments

then train against it: ``python train.py reward=remote reward.url=http://<host>:8765``.

Hydra overrides compose the reward exactly as ``train.py`` would (``conf/reward/<name>.yaml`` and
its keys); with ``--target`` the class is built with the ``key=value`` arguments instead (values
parsed as YAML; the class must be importable: run from its project or put it on PYTHONPATH). The
model is loaded once; requests are decoded in parallel and scored one at a time. Each request is
logged as one line on stderr; SIGTERM or Ctrl-C stops the server cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONF_DIR = os.path.join(ROOT, "conf")

from ddpo.errors import ConfigError, DDPOError  # noqa: E402
from rewards.remote import IMAGE_ENCODINGS, PROTOCOL, decode_images, encode_scores  # noqa: E402


def build_reward(overrides: list[str], target: str | None):
    """(reward, its name, its class path) from Hydra overrides, or from ``--target`` and ``key=value`` arguments."""
    from omegaconf import OmegaConf

    from ddpo.config import _instantiate

    if target:
        kwargs = [o.removeprefix("reward.") for o in overrides]
        bad = [o for o in kwargs if "=" not in o or o.startswith(("+", "~"))]
        if bad:
            raise ConfigError(f"with --target, give keyword arguments as key=value, got {bad}")
        node = OmegaConf.merge({"_target_": target}, OmegaConf.from_dotlist(kwargs))
        name = target.rsplit(".", 1)[-1]
    else:
        from hydra import compose, initialize_config_dir

        from ddpo.config import register_configs

        register_configs()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            try:
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            except Exception as exc:  # noqa: BLE001 (hydra raises several types for bad overrides)
                reason = " ".join(str(exc).split("Config search path")[0].split())[:300]
                raise ConfigError(f"cannot compose the reward from {overrides}: {reason}") from None
        name = cfg.hydra.runtime.choices.get("reward", "reward")
        node = cfg.reward
    if node.get("_target_") == "rewards.remote.RemoteReward":
        raise ConfigError("reward=remote cannot be served: pick the reward this server computes (reward=<name>)")
    return _instantiate(node, f"the reward ({name})"), name, node.get("_target_")


class RewardHandler(BaseHTTPRequestHandler):
    """GET /health, POST /score; every answer is JSON, errors as {"error": "..."}."""

    server_version = "ddpo-reward-server"
    protocol_version = "HTTP/1.1"  # keep-alive: a client may reuse the connection

    def do_GET(self):  # noqa: N802 (http.server's naming)
        started = time.perf_counter()
        if self.path.split("?")[0].rstrip("/") == "/health":
            service = self.server.service
            self.answer(200, service.describe(), started)
        else:
            self.answer(404, {"error": f"no such endpoint {self.path} (GET /health, POST /score)"}, started)

    def do_POST(self):  # noqa: N802
        started = time.perf_counter()
        if self.path.split("?")[0].rstrip("/") != "/score":
            self.discard_body()
            self.answer(404, {"error": f"no such endpoint {self.path} (GET /health, POST /score)"}, started)
            return
        service = self.server.service
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self.answer(411, {"error": "a Content-Length header is required"}, started)
            return
        if length > service.max_body:
            self.close_connection = True
            self.answer(413, {"error": f"request of {length} bytes exceeds --max-body-mb"}, started)
            return
        try:
            request = json.loads(self.rfile.read(length))
            images, prompts, metadata = parse_request(request)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.answer(400, {"error": f"bad request: {exc}"}, started)
            return
        try:
            answer = service.score(images, prompts, metadata)
        except Exception as exc:  # noqa: BLE001 (the reward's failure is the client's answer, the server goes on)
            self.answer(500, {"error": f"the reward failed: {type(exc).__name__}: {exc}"}, started, len(prompts))
            return
        self.answer(200, answer, started, len(prompts))

    def discard_body(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 < length <= self.server.service.max_body:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def answer(self, status: int, payload: dict, started: float, images: int | None = None):
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError as exc:  # the client went away (gave up waiting): nothing to answer to
            self.close_connection = True
            payload = {"error": f"answer not delivered: {type(exc).__name__}"}
        what = f" {images} image(s)" if images is not None else ""
        error = f" ({payload['error']})" if "error" in payload else ""
        self.server.service.log(
            f"{self.client_address[0]} {self.command} {self.path} {status}{what} "
            f"{time.perf_counter() - started:.3f}s{error}"
        )

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature): our own line per request
        pass


def parse_request(request) -> tuple:
    """(images tensor, prompts, metadata) of a /score request; ValueError naming what is wrong."""
    if not isinstance(request, dict):
        raise ValueError("the body must be a JSON object")
    if request.get("protocol", PROTOCOL) != PROTOCOL:
        raise ValueError(f"protocol {request.get('protocol')!r}; this server speaks {PROTOCOL}")
    if "images" not in request:
        raise ValueError("no 'images'")
    images = decode_images(request["images"])
    count = images.shape[0]
    prompts = request.get("prompts", [""] * count)
    metadata = request.get("metadata", [{}] * count)
    if not (isinstance(prompts, list) and len(prompts) == count and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"'prompts' must be a list of {count} strings (one per image)")
    if not (isinstance(metadata, list) and len(metadata) == count and all(isinstance(m, dict) for m in metadata)):
        raise ValueError(f"'metadata' must be a list of {count} objects (one per image)")
    return images, prompts, metadata


class RewardService:
    """The reward and what the handlers share: one lock, so the model scores one request at a time."""

    def __init__(self, reward, name: str, target: str, device: str, max_body: int):
        self.reward, self.name, self.target, self.device = reward, name, target, device
        self.max_body = max_body
        self.lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.requests = 0

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

    def log(self, line: str):
        with self.log_lock:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


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
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port (default 8765; 0 = any free port, printed when ready)"
    )
    parser.add_argument(
        "--device", default=None, help="device the reward scores on (default cuda if available, else cpu)"
    )
    parser.add_argument("--max-body-mb", type=float, default=1024, help="largest request accepted (default 1024 MB)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.reward:
        if args.target:
            parser.error("give --reward or --target, not both")
        overrides.insert(0, f"reward={args.reward}")

    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        reward, name, target = build_reward(overrides, args.target)
        if hasattr(reward, "to"):
            reward.to(device)
        service = RewardService(reward, name, target, device, int(args.max_body_mb * 2**20))
        try:
            server = ThreadingHTTPServer((args.host, args.port), RewardHandler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except DDPOError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the cause's
        return 1
    server.daemon_threads = True  # a request in flight does not hold up the shutdown
    server.service = service

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    print(f"serving reward {name} ({target}) on {device}, protocol {PROTOCOL}, at http://{shown}:{port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    print(f"stopped after {service.requests} scored request(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
