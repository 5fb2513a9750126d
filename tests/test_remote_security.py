"""Remote rewards against hostile or broken peers: the client follows no redirect (its token stays with
reward.url), ends every request within its deadline and can be abandoned; the reward server bounds
what a client can claim of it (decoded pixels, body size, threads, time) and checks a token."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_remote_reward import images, one_error_line, start_server, stop_server, wait_for_log

TOKEN = "s3cret-token"


# -- small servers of the test's own, on 127.0.0.1 -------------------------------------------------
class Recorder:
    """A server that records every request it gets (path and headers) and answers ``reply(handler)``."""

    def __init__(self, reply):
        self.requests: list[tuple[str, str, dict]] = []
        self.stop = threading.Event()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self):
                recorder.requests.append((self.command, self.path, dict(self.headers)))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                try:
                    reply(self, recorder)
                except OSError:
                    pass  # the client gave up

            do_GET = do_POST = handle_one  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()  # ends a drip or a wait in progress
        self.server.shutdown()
        self.server.server_close()


def answer(handler, status: int, body: bytes, **headers):
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


HEALTH = json.dumps({"protocol": 1, "status": "ok", "reward": "stub"}).encode()
SCORES = json.dumps({"protocol": 1, "rewards": [1.0, 2.0]}).encode()


# -- the client: redirects ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, endpoint",
    [(301, "/health"), (302, "/health"), (307, "/health"), (308, "/health"), (303, "/score"), (302, "/score")]
    + [(307, "/score"), (300, "/health"), (399, "/score")],
)
def test_a_redirect_is_an_error_and_the_credentials_never_reach_its_target(code, endpoint, monkeypatch):
    from rewards.remote import RemoteReward, RemoteRewardError

    monkeypatch.setenv("DDPO_REWARD_TOKEN", TOKEN)
    with Recorder(lambda h, r: answer(h, 200, HEALTH if h.command == "GET" else SCORES)) as target:

        def redirect(handler, recorder):
            if handler.path == endpoint:
                answer(handler, code, b"", Location=target.url + handler.path)
            else:
                answer(handler, 200, HEALTH)

        with Recorder(redirect) as redirector:
            with pytest.raises(RemoteRewardError) as caught:
                reward = RemoteReward(redirector.url, headers={"X-Api-Key": "key"}, retries=2, backoff=0.01)
                reward(images(2), ["a", "b"], [{}, {}])
            assert target.requests == []  # not even a request without the headers
            message = one_error_line(caught.value)
            assert f"reward server {redirector.url}{endpoint} redirected (HTTP {code})" in message, message
            assert target.url in message and "not followed" in message, message
            assert len(redirector.requests) == (1 if endpoint == "/health" else 2)  # not retried
            assert redirector.requests[0][2].get("Authorization") == f"Bearer {TOKEN}"  # reward.url gets it


# -- the client: the deadline and abandoning ------------------------------------------------------
@pytest.mark.parametrize("drip_from", ["status_line", "body"])
def test_an_answer_dripping_one_byte_at_a_time_ends_within_the_deadline(drip_from):
    from rewards.remote import RemoteReward, RemoteRewardError

    def drip(handler, recorder):
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(SCORES)}\r\n\r\n".encode()
        whole = head + SCORES
        start = 0 if drip_from == "status_line" else len(head)
        handler.wfile.write(whole[:start])
        handler.wfile.flush()
        for i in range(start, len(whole)):  # one byte per 0.5 s: each read waits less than the timeout
            if recorder.stop.wait(0.5):
                return
            handler.wfile.write(whole[i : i + 1])
            handler.wfile.flush()

    timeout = 1.5
    with Recorder(drip) as server:
        reward = RemoteReward(server.url, timeout=timeout, retries=1, backoff=0.0, check_health=False)
        started = time.monotonic()
        with pytest.raises(RemoteRewardError) as caught:
            reward(images(2), ["a", "b"], [{}, {}])
        elapsed = time.monotonic() - started
    assert elapsed < 2 * timeout + 5, elapsed  # 2 tries, each ended at its deadline (plus generous slack)
    message = one_error_line(caught.value)
    assert f"reward server {server.url}/score did not answer after 2 tries" in message, message
    assert "no complete answer within the 1.5 s deadline (reward.timeout)" in message, message


def test_close_abandons_a_pending_request_at_once_and_retries_nothing():
    from rewards.remote import RemoteReward, RemoteRewardError

    def never(handler, recorder):
        recorder.stop.wait(60)  # answers nothing until the test ends

    with Recorder(never) as server:
        reward = RemoteReward(server.url, timeout=60, retries=3, backoff=0.0, check_health=False)
        outcome: list[BaseException] = []

        def call():
            try:
                reward(images(2), ["a", "b"], [{}, {}])
            except BaseException as exc:  # noqa: BLE001 (handed to the test)
                outcome.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.requests, "the request never reached the server"
        reward.close()  # what a stopping trainer does
        thread.join(timeout=10)
        assert not thread.is_alive(), "close() did not end the pending request"
    assert len(outcome) == 1 and isinstance(outcome[0], RemoteRewardError), outcome
    message = one_error_line(outcome[0])
    assert f"reward server {server.url}/score" in message and "abandoned" in message, message
    assert len(server.requests) == 1  # no retry after close()


def test_the_token_variable_is_sent_as_a_bearer_header_and_an_empty_one_is_a_config_error(monkeypatch):
    from ddpo.errors import ConfigError
    from rewards.remote import RemoteReward

    with Recorder(lambda h, r: answer(h, 200, HEALTH)) as server:
        monkeypatch.setenv("MY_REWARD_TOKEN", TOKEN)
        RemoteReward(server.url, token_env="MY_REWARD_TOKEN")
        assert server.requests[-1][2].get("Authorization") == f"Bearer {TOKEN}"
        RemoteReward(server.url, token_env="MY_REWARD_TOKEN", headers={"Authorization": "Basic abc"})
        assert server.requests[-1][2].get("Authorization") == "Basic abc"  # reward.headers win
        monkeypatch.setenv("MY_REWARD_TOKEN", " ")
        with pytest.raises(ConfigError, match=r"\$MY_REWARD_TOKEN \(reward\.token_env\) is set but empty"):
            RemoteReward(server.url, token_env="MY_REWARD_TOKEN")


# -- the reward server ----------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """Threads, VmSize, VmRSS and VmHWM (peak RSS) of a process, from /proc (kB for the Vm fields)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmSize", "VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def call(url: str, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 30):
    """(status, JSON answer) of one request; ``headers`` None: the token's."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if headers is None:
            headers = {"Authorization": f"Bearer {TOKEN}"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def raw_request(url: str, head: str, timeout: float = 15) -> tuple[int, bytes]:
    """Send ``head`` (a request line and headers, nothing more) and read the answer's status line.
    A server that waits for a body the client never sends fails the test with a timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), received[:200]
    return int(status_line.split()[1]), received


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """The reward server with its default limits and a token."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    process, url = start_server(log, "reward=jpeg_compressibility", env={"DDPO_REWARD_TOKEN": TOKEN})
    yield process, url, log
    assert stop_server(process) == 0, log.read_text()[-2000:]


def bomb_png(width: int, height: int) -> bytes:
    """A valid black RGB PNG of ``width`` x ``height``: a few hundred KB that decode to w*h*3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_images_announcing_too_many_pixels_are_refused_before_decoding(guarded_server, encoding):
    import base64

    process, url, log = guarded_server
    if encoding == "png":
        png = bomb_png(9000, 9000)  # 81 Mpx: 243 MB of pixels, 3.3 GB in the old server
        assert len(png) < 400_000
        images_field = {"encoding": "png", "data": [base64.b64encode(png).decode()]}
    else:
        images_field = {"encoding": "raw", "shape": [1, 9000, 9000, 3], "data": "AAAA"}
    before = proc_status(process.pid)
    body = json.dumps({"protocol": 1, "images": images_field, "prompts": ["a"], "metadata": [{}]}).encode()
    status, answer = call(url, "POST", "/score", body, timeout=120)
    after = proc_status(process.pid)
    assert status == 413, (status, answer)
    assert "exceed the limit" in answer["error"] and "--max-megapixels" in answer["error"], answer
    assert after["VmHWM"] - before["VmHWM"] < 150 * 1024, (before, after)  # nothing of the 243 MB was decoded
    assert call(url, "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    "length, expected",
    [
        ("-1", 400),  # the old server read until the client closed: a handler blocked for ever
        ("abc", 400),
        ("+12", 400),
        ("1_000", 400),
        (None, 400),  # no Content-Length on a POST
        (str(300 * 2**20), 413),  # above the default 256 MiB (the old default, 1 GiB, waited for it)
        (str(10**30), (400, 413)),  # a guard: too long to be a length (the old server refused it too)
    ],
)
def test_bad_or_too_large_lengths_are_refused_without_reading_the_body(guarded_server, length, expected):
    _, url, _ = guarded_server
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    head += "" if length is None else f"Content-Length: {length}\r\n"
    status, received = raw_request(url, head + "\r\n")  # and no body: a server that waits for one times out
    assert status in (expected if isinstance(expected, tuple) else (expected,)), received[:300]
    assert b"Connection: close" in received  # the unread body (if any) is not taken for the next request
    assert raw_request(url, "POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")[0] in (400, 401)


def test_many_slow_connections_hold_no_thread_and_health_still_answers(guarded_server):
    process, url, _ = guarded_server
    host, port = url.removeprefix("http://").split(":")
    before = proc_status(process.pid)
    slow: list[socket.socket] = []
    try:
        for i in range(150):
            sock = socket.create_connection((host, int(port)), timeout=10)
            slow.append(sock)
            if i % 2:  # headers that never end (slowloris)
                sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            else:  # a body announced (100 MiB, allowed) that never comes
                head = f"POST /score HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {100 * 2**20}\r\n\r\n"
                sock.sendall(head.encode() + b'{"proto')
        status, answer = call(url, "GET", "/health", timeout=10)
        assert status == 200 and answer["status"] == "ok", answer
        samples = []
        for _ in range(20):  # the old server had spawned one thread per connection by now
            samples.append(proc_status(process.pid))
            time.sleep(0.1)
        assert max(s["Threads"] for s in samples) <= before["Threads"] + 4, (before, samples[-1])
        assert max(s["VmSize"] for s in samples) - before["VmSize"] < 1024 * 1024, (before, samples[-1])
    finally:
        for sock in slow:
            sock.close()
    assert call(url, "GET", "/health", timeout=10)[0] == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_a_request_without_the_token_is_refused_with_401(guarded_server, authorization, monkeypatch):
    from rewards.remote import RemoteReward, RemoteRewardError

    _, url, _ = guarded_server
    headers = {"Authorization": authorization} if authorization else {}
    for method, path, body in [("GET", "/health", None), ("POST", "/score", b"{}")]:
        status, answer = call(url, method, path, body, headers=headers)
        assert status == 401 and "valid token is required" in answer["error"], (status, answer)

    monkeypatch.setenv("DDPO_REWARD_TOKEN", "another-token")
    with pytest.raises(RemoteRewardError) as caught:
        RemoteReward(url, retries=0)
    message = one_error_line(caught.value)
    assert f"reward server {url}/health refused the request: HTTP 401" in message, message
    assert "another-token" not in message
    monkeypatch.setenv("DDPO_REWARD_TOKEN", TOKEN)
    assert RemoteReward(url).server["reward"] == "jpeg_compressibility"


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """The reward server with a 1 s --timeout and room for one /score request at a time."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    process, url = start_server(log, "reward=jpeg_compressibility", "--timeout", "1", "--max-requests", "1")
    yield process, url, log
    assert stop_server(process) == 0, log.read_text()[-2000:]


def test_slow_clients_are_cut_off_after_the_timeout_and_a_busy_server_answers_503(strict_server):
    process, url, log = strict_server
    host, port = url.removeprefix("http://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=15) as headers_never_end,
        socket.create_connection((host, int(port)), timeout=15) as body_never_ends,
    ):
        headers_never_end.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        body_never_ends.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        # while the body is awaited, the only /score slot is taken: another request is told 503 at once
        deadline = time.monotonic() + 10
        while True:
            status, answer = call(url, "POST", "/score", b"{}")
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # until the server has read the slow request's headers
        assert status == 503 and "--max-requests" in answer["error"], (status, answer)
        assert call(url, "GET", "/health")[0] == 200
        # both slow clients are cut off after about --timeout: the server closes their connections
        assert headers_never_end.recv(65536) == b""  # a request never completed: closed without an answer
        answered = body_never_ends.recv(65536)
        assert answered.startswith(b"HTTP/1.1 408 "), answered[:200]

    def logged(lines):  # written after the answer: wait for it
        return any("POST /score 408" in line and "--timeout" in line for line in lines)

    assert logged(wait_for_log(log, logged)), log.read_text()[-2000:]
