"""Remote rewards: ``scripts/reward_server.py`` serving jpeg_compressibility and ``reward=remote`` scoring
through it (the local reward's values, in training too), a stub server answering malformed data, and
(slow) a server killed in the middle of a run."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, compose, read_metrics, run_in_process

SERVER = ROOT / "scripts" / "reward_server.py"
ONE_EPOCH = [*TINY, "num_epochs=1"]


def start_server(log_file: Path, *args: str, port: int = 0, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start scripts/reward_server.py (``env``: extra environment); return the process and the URL it prints."""
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVER), *args, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("serving reward "):
                return process, line.split()[-1]
            if not line:  # the server exited
                break
    process.kill()
    pytest.fail(f"the reward server did not start: {log_file.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    finally:
        process.kill()


def wait_for_log(log: Path, done, timeout: float = 30.0) -> list[str]:
    """The log's lines once ``done(lines)`` holds, or when ``timeout`` passes: the server writes a
    request's line after answering it, so a test that reads the log at once may be too early."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().splitlines()
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def closed_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images(count: int = 5, size: int = 32) -> torch.Tensor:
    """Smooth gradients and noise: images whose JPEG sizes differ."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(count, 3, size, size, generator=generator)
    ramp = torch.linspace(0, 1, size)
    batch[::2] = ramp.view(1, 1, size).expand(3, size, size) * torch.rand(count // 2 + count % 2, 3, 1, 1)
    return batch


def one_error_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.fixture(scope="module")
def jpeg_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process, url = start_server(log, "reward=jpeg_compressibility")
    yield url, log
    assert stop_server(process) == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_remote_rewards_equal_the_local_reward_on_the_same_images(jpeg_server, encoding):
    from rewards.jpeg import JpegCompressibility
    from rewards.remote import RemoteReward

    url, log = jpeg_server
    batch = images(5)
    prompts = [f"prompt {i}" for i in range(5)]
    metadata = [{"class": "cat", "pair": (1, 2), "score": float("nan")}] * 5  # tuples and NaN travel as JSON
    logged_before = len(log.read_text().splitlines())
    remote = RemoteReward(url, batch_size=2, image_encoding=encoding)  # 3 requests: 2 + 2 + 1 images
    assert remote.server["reward"] == "jpeg_compressibility"
    rewards, info = remote(batch, prompts, metadata)
    expected, expected_info = JpegCompressibility()(batch, prompts, metadata)
    assert rewards.dtype == torch.float32 and rewards.shape == (5,)
    assert torch.equal(rewards, expected)  # the same 8-bit pixels: the same JPEG bytes
    assert torch.equal(info["jpeg_kb"], expected_info["jpeg_kb"])
    assert len(set(rewards.tolist())) > 1

    def logged(lines):  # this test's 3 requests, whenever the server writes their lines
        ours = lines[logged_before:]
        return sum("POST /score 200 2 image(s)" in line for line in ours) >= 2 and any(
            "POST /score 200 1 image(s)" in line for line in ours
        )

    assert logged(wait_for_log(log, logged)), log.read_text()[-2000:]


def test_a_run_with_the_remote_reward_equals_the_local_run(jpeg_server, tmp_path):
    url, _ = jpeg_server
    run_in_process(tmp_path / "local", [*ONE_EPOCH, "reward=jpeg_compressibility"])
    run_in_process(tmp_path / "remote", [*ONE_EPOCH, "reward=remote", f"reward.url={url}", "reward.batch_size=1"])
    local, remote = read_metrics(tmp_path / "local")[0], read_metrics(tmp_path / "remote")[0]
    for key in ("reward_mean", "reward_std", "reward_jpeg_kb_mean", "loss"):
        assert remote[key] == pytest.approx(local[key], rel=1e-6, abs=1e-7), key


def test_a_down_server_stops_the_build_in_one_line_naming_url_and_tries():
    from ddpo.config import _instantiate
    from ddpo.errors import DDPOError
    from rewards.remote import RemoteReward, RemoteRewardError

    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(RemoteRewardError) as caught:
        RemoteReward(url, retries=2, backoff=0.05)
    assert time.monotonic() - started < 5
    message = one_error_line(caught.value)
    assert url in message and "3 tries" in message and "refused" in message.lower(), message

    # through the config builder, as train.py builds it: the same line, not wrapped
    cfg = compose(["reward=remote", f"reward.url={url}", "reward.retries=0"])
    with pytest.raises(DDPOError) as caught:
        _instantiate(cfg.reward, "the reward (reward=...)")
    assert f"reward server {url}/health did not answer after 1 try" in one_error_line(caught.value)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("url", "localhost:8765", "reward.url"),
        ("timeout", 0, "reward.timeout"),
        ("retries", -1, "reward.retries"),
        ("backoff", -1.0, "reward.backoff"),
        ("deadline", 0, "reward.deadline"),
        ("deadline", float("nan"), "reward.deadline"),
        ("batch_size", 0, "reward.batch_size"),
        ("image_encoding", "jpeg", "reward.image_encoding"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(key, value, words):
    from ddpo.errors import ConfigError
    from rewards.remote import RemoteReward

    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        RemoteReward(**{key: value, "check_health": False})


# -- a stub server: answers exactly what a test scripts ---------------------------------------------
class Stub:
    """``answers``: (status, body bytes, delay seconds) per /score request, the last repeated."""

    def __init__(self):
        self.answers: list[tuple[int, bytes, float]] = [(200, b"{}", 0.0)]
        self.health = (200, json.dumps({"protocol": 1, "status": "ok", "reward": "stub"}).encode())
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.reply(*stub.health)

            def do_POST(self):  # noqa: N802
                stub.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body, delay = stub.answers[min(len(stub.requests), len(stub.answers)) - 1]
                time.sleep(delay)
                self.reply(status, body)

            def reply(self, status, body):
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def stub():
    server = Stub()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _scores(rewards, **info) -> bytes:
    return json.dumps({"protocol": 1, "rewards": rewards, "info": info}).encode()


MALFORMED = {
    "not_json": ((200, b"<html>Internal proxy page</html>"), "not JSON"),
    "empty_body": ((200, b""), "not JSON"),
    "not_an_object": ((200, b"[1, 2]"), "expected a JSON object"),
    "missing_rewards": ((200, b'{"scores": [1, 2]}'), "no 'rewards' key"),
    "wrong_count": ((200, _scores([1.0])), "has 1 values for 2 images"),
    "nan": ((200, b'{"rewards": [NaN, 1.0]}'), "1 non-finite reward(s)"),
    "inf": ((200, b'{"rewards": [Infinity, -Infinity]}'), "2 non-finite reward(s)"),
    "null": ((200, b'{"rewards": [null, 1.0]}'), "1 non-finite reward(s)"),
    "strings": ((200, _scores(["good", "bad"])), "non-number"),
    "info_wrong_length": ((200, _scores([1.0, 2.0], jpeg_kb=[1.0])), "info['jpeg_kb'] has 1 values for 2 images"),
    "info_not_a_list": ((200, _scores([1.0, 2.0], jpeg_kb=3)), "info['jpeg_kb'] must be a list"),
    "wrong_protocol": ((200, b'{"protocol": 2, "rewards": [1, 2]}'), "protocol 2"),
    "server_error": ((500, b'{"error": "the reward failed: RuntimeError: CUDA out of memory"}'), "CUDA out of memory"),
    "bad_request": ((400, b"no"), "HTTP 400"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_answer_is_one_line_naming_the_url(stub, case):
    from rewards.remote import RemoteReward, RemoteRewardError

    (status, body), words = MALFORMED[case]
    stub.answers = [(status, body, 0.0)]
    reward = RemoteReward(stub.url, retries=3, backoff=0.01)
    with pytest.raises(RemoteRewardError) as caught:
        reward(images(2), ["a", "b"], [{}, {}])
    message = one_error_line(caught.value)
    assert f"{stub.url}/score" in message and words in message, message
    assert len(stub.requests) == 1, "a malformed answer or a refused request is not retried"


def test_a_malformed_answer_stops_training_in_one_line(stub, tmp_path):
    from rewards.remote import RemoteRewardError

    stub.answers = [(200, _scores([1.0]), 0.0)]
    with pytest.raises(RemoteRewardError) as caught:  # the remote reward's own error, not wrapped by the trainer
        run_in_process(tmp_path / "run", [*ONE_EPOCH, "reward=remote", f"reward.url={stub.url}"])
    message = one_error_line(caught.value)
    assert message.startswith(f"reward server {stub.url}/score answered malformed data: "), message
    assert "has 1 values for 2 images" in message and "failed:" not in message, message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failing_server_ends_train_py_with_its_own_line_and_exit_status_1(stub, tmp_path):
    """The error boundary prints the remote reward's one line as raised: no "reward ... failed: ..." prefix."""
    from tests.conftest import run_cli

    stub.answers = [(400, b"no", 0.0)]
    result = run_cli(tmp_path / "run", [*ONE_EPOCH, "reward=remote", f"reward.url={stub.url}"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: reward server {stub.url}/score ") and "HTTP 400" in last, last
    assert "failed:" not in last and len(last) < 300, last
    assert last in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_collect_reward_passes_project_errors_through_and_names_foreign_ones():
    from concurrent.futures import Future

    from ddpo.errors import ConfigError
    from ddpo.reward_calls import RewardError, collect_reward
    from rewards.remote import RemoteRewardError

    def failed(exc: BaseException) -> Future:
        future = Future()
        future.set_exception(exc)
        return future

    for error in (RemoteRewardError("reward server http://x/score did not answer after 3 tries"), ConfigError("bad")):
        with pytest.raises(type(error)) as caught:
            collect_reward("remote (RemoteReward)", failed(error), 2)
        assert caught.value is error  # as raised: same object, same one-line message
    with pytest.raises(RewardError) as caught:
        collect_reward("jpeg", failed(RuntimeError("scorer exploded")), 2)
    assert str(caught.value) == "reward 'jpeg' failed: RuntimeError: scorer exploded"


def test_a_server_of_another_protocol_is_refused_when_built(stub):
    from rewards.remote import RemoteReward, RemoteRewardError

    stub.health = (200, b'{"protocol": 2}')
    with pytest.raises(RemoteRewardError, match="speaks protocol 2; this client speaks 1"):
        RemoteReward(stub.url)


def test_busy_answers_are_retried_with_backoff(stub):
    from rewards.remote import RemoteReward

    stub.answers = [(503, b'{"error": "busy"}', 0.0), (503, b"", 0.0), (200, _scores([1.0, 2.0], x=[3.0, None]), 0.0)]
    reward = RemoteReward(stub.url, retries=2, backoff=0.1)
    started = time.monotonic()
    rewards, info = reward(images(2), ["a", "b"], [{}, {}])
    assert time.monotonic() - started >= 0.1 + 0.2  # backoff 0.1 s, then doubled
    assert rewards.tolist() == [1.0, 2.0] and len(stub.requests) == 3
    assert info["x"][0].item() == 3.0 and torch.isnan(info["x"][1])  # null info: "does not apply"


def test_retries_are_bounded_and_the_error_names_the_tries(stub):
    from rewards.remote import RemoteReward, RemoteRewardError

    stub.answers = [(503, b'{"error": "overloaded"}', 0.0)]
    with pytest.raises(RemoteRewardError) as caught:
        RemoteReward(stub.url, retries=2, backoff=0.01)(images(2), ["a", "b"], [{}, {}])
    message = one_error_line(caught.value)
    assert "did not answer after 3 tries" in message and "HTTP 503: overloaded" in message, message
    assert len(stub.requests) == 3


def test_a_server_slower_than_the_timeout_times_out_after_the_retries(stub):
    from rewards.remote import RemoteReward, RemoteRewardError

    stub.answers = [(200, _scores([1.0, 2.0]), 1.0)]
    started = time.monotonic()
    with pytest.raises(RemoteRewardError) as caught:
        RemoteReward(stub.url, timeout=0.2, retries=1, backoff=0.0)(images(2), ["a", "b"], [{}, {}])
    assert time.monotonic() - started < 2
    message = one_error_line(caught.value)
    assert "after 2 tries" in message and "timed out" in message, message


def test_the_deadline_bounds_a_request_with_all_its_tries_and_backoff(stub):
    from rewards.remote import RemoteReward, RemoteRewardError

    stub.answers = [(200, _scores([1.0, 2.0]), 3.0)]  # every answer comes after 3 s
    reward = RemoteReward(stub.url, timeout=1.0, retries=5, backoff=0.2, deadline=1.5, check_health=False)
    started = time.monotonic()
    with pytest.raises(RemoteRewardError) as caught:
        reward(images(2), ["a", "b"], [{}, {}])
    elapsed = time.monotonic() - started
    # without the deadline: 6 tries of 1 s and 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of backoff, 12 s in all
    assert 1.4 < elapsed < 2.5, elapsed
    message = one_error_line(caught.value)
    assert f"reward server {stub.url}/score did not answer within the 1.5 s deadline (reward.deadline)" in message
    assert "after 2 tries" in message and "s left of reward.deadline" in message, message
    assert len(stub.requests) == 2  # the second try got the 0.3 s left; no third one started


def test_a_big_batch_goes_in_chunks_and_the_request_follows_the_protocol(stub):
    from rewards.remote import RemoteReward, decode_images

    stub.answers = [(200, _scores([0.0, 1.0], k=[5.0, 6.0]), 0.0), (200, _scores([2.0], k=[7.0]), 0.0)]
    batch = images(3)
    reward = RemoteReward(stub.url, batch_size=2, image_encoding="raw")
    rewards, info = reward(batch, ["a", "b", "c"], [{"i": 0}, {"i": 1}, {"i": 2}])
    assert rewards.tolist() == [0.0, 1.0, 2.0] and info["k"].tolist() == [5.0, 6.0, 7.0]
    first, second = stub.requests
    assert first["protocol"] == 1 and first["prompts"] == ["a", "b"] and second["metadata"] == [{"i": 2}]
    assert first["images"]["encoding"] == "raw" and first["images"]["shape"] == [2, 32, 32, 3]
    sent = torch.cat([decode_images(first["images"]), decode_images(second["images"])])
    assert torch.equal(sent, (batch * 255).round() / 255)  # 8-bit pixels, rounded as the local rewards round


# -- slow: the server dies in the middle of a run ---------------------------------------------------
def run_train(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_killing_the_server_stops_the_run_in_one_line_and_the_rerun_resumes(tmp_path):
    log = tmp_path / "server.log"
    server, url = start_server(log, "--reward", "jpeg_compressibility")
    port = int(url.rsplit(":", 1)[1])
    run_dir = tmp_path / "run"
    remote = ["reward=remote", f"reward.url={url}", "reward.retries=2", "reward.backoff=0.2"]
    process = run_train(run_dir, [*TINY, "num_epochs=200", *remote])
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "checkpoint_00002").is_dir():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)
        server.kill()  # gone at once, in the middle of whatever it was doing
        server.wait(timeout=30)
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
        server.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: reward server {url}/score did not answer after 3 tries"), last
    assert last in (run_dir / "train.log").read_text()
    done = [r["epoch"] for r in read_metrics(run_dir)]
    assert done == list(range(len(done))) and len(done) >= 2

    server, restarted = start_server(log, "--reward", "jpeg_compressibility", port=port)
    try:
        assert restarted == url
        rerun = run_train(run_dir, [*TINY, f"num_epochs={len(done) + 2}", *remote])
        _, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr[-3000:]
    finally:
        assert stop_server(server) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == list(range(len(done) + 2))
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_train_py_stops_before_sampling_when_the_server_is_down(tmp_path):
    from tests.conftest import run_cli

    url = f"http://127.0.0.1:{closed_port()}"
    result = run_cli(tmp_path / "run", [*ONE_EPOCH, "reward=remote", f"reward.url={url}", "reward.backoff=0.05"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: reward server {url}/health did not answer after 4 tries"), last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
