"""The reward server in a subprocess on 127.0.0.1: results over HTTP equal offline ``rm.score``
under concurrent clients, the OpenRLHF request shape, every bad input with its status and field,
overload (503 + Retry-After, nothing accepted lost), and SIGTERM under load (every accepted
request answered, exit 0)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from model_helpers import tiny_reward_model

import cloud_jax

PROMPTS = ["What is 2+2?", "Name a colour.", "Hi", "Say something long: " + "la " * 12,
           "Why is the sky blue?"]
RESPONSES = ["4", "Blue, like the sky.", "Hello there!", "la la", "Rayleigh scattering."]
LIMIT = 256  # --max-length


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model"
    tiny_reward_model(3).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm(checkpoint):
    return cloud_jax.load(checkpoint)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_jax", "serve", "--checkpoint", str(checkpoint),
             "--port", str(self.port), "--max-length", str(LIMIT), "--log-level", "warning",
             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: "
                                   f"{self.proc.stdout.read()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not become ready")

    def metric(self, name):
        text = requests.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module", params=["static", "continuous"])
def server(checkpoint, request):
    s = Server(checkpoint, "--slots", "6", "--max-critique-tokens", "6", "--batching",
               request.param)
    yield s
    s.stop()


def _offline(rm, prompts, responses, **settings):
    return rm.score(prompts, responses, **settings)


def _check(result_json, offline, i):
    assert result_json["critiques"] == offline.critiques[i]
    np.testing.assert_allclose(result_json["sample_rewards"], offline.sample_rewards[i],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(result_json["reward"], offline.rewards[i], atol=1e-5, rtol=0)
    assert result_json["truncated"] == offline.truncated[i].tolist()


def test_concurrent_clients_get_what_offline_scoring_gives(server, rm):
    # 16 clients, mixed lengths and settings, all at once.
    jobs = []
    for c in range(16):
        idx = [(c + j) % len(PROMPTS) for j in range(1 + c % 3)]
        settings = {"num_samples": 1 + c % 3, "temperature": [0.0, 0.7, 1.3][c % 3],
                    "max_critique_tokens": 2 + c % 5, "seed": c % 4}
        jobs.append((idx, settings))

    def call(job):
        idx, settings = job
        body = {"items": [{"prompt": PROMPTS[i], "response": RESPONSES[i]} for i in idx],
                **settings}
        return requests.post(server.url + "/v1/score", json=body, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, jobs))
    for (idx, settings), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        offline = _offline(rm, [PROMPTS[i] for i in idx], [RESPONSES[i] for i in idx], **settings)
        for j, result in enumerate(answer.json()["results"]):
            _check(result, offline, j)


def test_the_openrlhf_request_shape(server, rm):
    tok = rm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in PROMPTS[:3]]
    queries = [p + r + "<eot>" for p, r in zip(prompts, RESPONSES[:3])]
    offline = _offline(rm, PROMPTS[:3], RESPONSES[:3], max_critique_tokens=6)
    for body in ({"query": queries, "prompts": prompts, "labels": ["", "", ""]},
                 {"query": queries}):
        answer = requests.post(server.url + "/get_reward", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        out = answer.json()
        np.testing.assert_allclose(out["rewards"], offline.rewards, atol=1e-5, rtol=0)
        assert out["scores"] == out["rewards"]
        assert set(out["extra_logs"]) == {"reward_std", "truncated_fraction"}
    # OpenRLHF splits a batch over its reward servers in ceil(n / servers) chunks, so a server
    # past the queries gets an empty one (0.8 and later send each query alone: every server but
    # the first): answered with empty lists, as a 422 stopped every reward of the batch.
    answer = requests.post(server.url + "/get_reward",
                           json={"query": [], "prompts": [], "labels": []}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"rewards": [], "scores": [],
                             "extra_logs": {"reward_std": [], "truncated_fraction": []}}


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/score", b"{not json", 400, "body"),
    ("/v1/score", [1, 2], 400, "body"),
    # JSON Python's reader refuses past its limits: a 400, not a 500 from inside the reader.
    pytest.param("/v1/score", b"[" * 100000 + b"]" * 100000, 400, "body", id="deeply-nested"),
    pytest.param("/v1/score", b'{"items": [{"prompt": "a", "response": "b"}], "seed": '
                 + b"1" * 5000 + b"}", 400, "body", id="5000-digit-integer"),
    ("/v1/score", {}, 422, "items"),
    ("/v1/score", {"items": []}, 422, "items"),
    ("/v1/score", {"items": "x"}, 422, "items"),
    ("/v1/score", {"items": [{"prompt": "a"}]}, 422, "items[0].response"),
    ("/v1/score", {"items": [{"prompt": "a", "response": 3}]}, 422, "items[0].response"),
    ("/v1/score", {"items": [{"prompt": 5, "response": "b"}]}, 422, "items[0].prompt"),
    ("/v1/score", {"items": [{"prompt": [{"role": "system", "content": "s"}], "response": "b"}]},
     422, "items[0].prompt"),
    # A key the layout has no place for (a speaker's name) was dropped without a word.
    ("/v1/score", {"items": [{"prompt": [{"role": "user", "content": "a", "name": "Ann"}],
                              "response": "b"}]}, 422, "items[0].prompt[0].name"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "num_samples": 0}, 422,
     "num_samples"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "num_samples": "2"}, 422,
     "num_samples"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "temperature": -1}, 422,
     "temperature"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "temperature": 1, "top_k": 3,
                   "top_p": 0.5}, 422, "top_k"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "max_critique_tokens": 10**6},
     422, "max_critique_tokens"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "colour": "red"}, 422, "colour"),
    # JSON integers have no size limit; one too large for a float is out of range, not a 500.
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "temperature": 10**400}, 422,
     "temperature"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "repetition_penalty": -10**400},
     422, "repetition_penalty"),
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes.
    ("/v1/score", {"items": [{"prompt": "a\ud800", "response": "b"}]}, 422, "items[0].prompt"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "\udc80"}]}, 422, "items[0].response"),
    ("/get_reward", {"query": ["<bos><|user|>\ud800<eot><|assistant|>b<eot>"]}, 422, "query[0]"),
    ("/v1/score", {"items": [{"prompt": "a" * 600, "response": "b"}]}, 413, "items[0]"),
    ("/get_reward", {"query": ["a", 3]}, 422, "query[1]"),
    ("/get_reward", {"query": ["ab"], "prompts": ["a", "b"]}, 422, "prompts"),
    ("/get_reward", {"query": ["ab"], "prompts": ["x"]}, 422, "query[0]"),
    ("/get_reward", {"query": ["no template here"]}, 422, "query[0]"),
    # Errors name the endpoint's own field: the query, not "items".
    ("/get_reward", {"query": ["<bos><|user|>" + "a" * 600 + "<eot><|assistant|>b<eot>"]}, 413,
     "query[0]"),
    # A system message or a second turn has no place in the layout: refused, as /v1/score does.
    ("/get_reward", {"query": ["<bos><|system|>Be terse.<eot><|user|>a<eot><|assistant|>b<eot>"]},
     422, "query[0]"),
    # Requests no retry could help: 422, not 503 "retry later".
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}] * 257}, 422, "items"),
    ("/get_reward", {"query": ["<bos><|user|>a<eot><|assistant|>b<eot>"] * 257}, 422, "query"),
    ("/v1/score", {"items": [{"prompt": "a", "response": "b"}], "num_samples": 7}, 422,
     "num_samples"),
])
def test_bad_input_gets_its_status_and_names_the_field(server, path, body, status, field):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = requests.post(server.url + path, data=data,
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field, answer.json()
    if status == 413:
        assert str(LIMIT) in answer.json()["error"]
    # The server keeps serving.
    ok = requests.post(server.url + "/v1/score",
                       json={"items": [{"prompt": "a", "response": "b"}]}, timeout=30)
    assert ok.status_code == 200


def test_a_long_input_does_not_hold_up_the_rest_of_the_server(server):
    """Tokenizing a megabyte prompt takes seconds; /health (and every answer) is served meanwhile.
    It waited for the tokenizer: the request was checked on the event loop."""
    answers = []
    long = {"items": [{"prompt": "x" * 1_000_000, "response": "b"}]}
    sender = threading.Thread(target=lambda: answers.append(
        requests.post(server.url + "/v1/score", json=long, timeout=300)))
    sender.start()
    time.sleep(0.3)  # the long request is being tokenized
    start = time.monotonic()
    health = requests.get(server.url + "/health", timeout=60)
    waited = time.monotonic() - start
    in_flight = sender.is_alive()
    sender.join()
    assert health.status_code == 200 and answers[0].status_code == 413
    assert in_flight and waited < 1.0, waited


def test_a_client_that_goes_away_while_sending_is_no_server_error(server):
    """A client that closes its connection halfway through its body is counted as gone (499),
    as one that goes away while its request is scored; it was a 500 with a logged traceback."""
    def count(status):
        return server.metric(f'cloud_requests_total{{endpoint="/v1/score",status="{status}"}}')

    errors, gone = count(500), count(499)
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"items\": [")
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while count(499) == gone and count(500) == errors:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (count(499), count(500)) == (gone + 1, errors)


_WAITING_SERVER = """
import sys
from concurrent.futures import Future
from cloud_jax.serving.server import serve
from cloud_jax.serving.types import BackendStats, Settings

class Waiting:  # answers nothing: its requests wait until their clients go
    ready = True
    def __init__(self):
        self.waiting = set()
    def start(self):
        pass
    def submit(self, items, settings):
        future = Future()
        self.waiting.add(future)
        return future
    def cancel(self, future):
        self.waiting.discard(future)
        future.cancel()
    def stats(self):
        return BackendStats(len(self.waiting), 0, 1, 0)
    def close(self, drain=True):
        pass

sys.exit(serve(Waiting(), Settings(), None, port=int(sys.argv[1]), log_level="warning"))
"""


def _start_waiting_server(port: int) -> subprocess.Popen:
    """The server of _WAITING_SERVER on ``port``, once it answers /health."""
    return _start_script_server(_WAITING_SERVER, port)


def _start_script_server(script: str, port: int, **popen) -> subprocess.Popen:
    """``python -c script port``, once it answers /health (output to DEVNULL unless ``popen``
    says otherwise)."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)], **popen)
    deadline = time.monotonic() + 60
    try:
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                return proc
            except requests.ConnectionError:
                time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _queue_depth(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("cloud_queue_depth "))


def test_waiting_requests_cost_no_cpu_and_are_cancelled_when_their_clients_go():
    """An RL loop's whole rollout may wait in the queue, one request per item. Each waiting
    request polled its connection 20 times a second: 500 of them took about half a core of the
    event loop. They now wait for the disconnect itself, which still cancels them."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_waiting_server(port)
    conns = []
    try:
        deadline = time.monotonic() + 60
        body = json.dumps({"items": [{"prompt": "a", "response": "b"}]}).encode()
        head = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))

        for _ in range(500):
            conns.append(socket.create_connection(("127.0.0.1", port)))
            conns[-1].sendall(head + body)
        while _queue_depth(url) < 500:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s():
            fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before = cpu_s()
        time.sleep(3)
        assert cpu_s() - before < 0.25
        for conn in conns:
            conn.close()
        while _queue_depth(url) > 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for conn in conns:
            conn.close()
        proc.kill()
        proc.wait()


def test_a_request_its_client_gives_up_on_after_a_timeout_is_cancelled():
    """OpenRLHF's client posts with requests and a fixed timeout, then sends the request again:
    the request it gave up on leaves the queue (requests closes the connection when its timeout
    fires, and the server cancels a request whose client has gone), so the queue does not hold
    both (docs/SERVING.md)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_waiting_server(port)
    try:
        deadline = time.monotonic() + 60

        body = {"items": [{"prompt": "a", "response": "b"}]}
        with pytest.raises(requests.Timeout):
            requests.post(url + "/v1/score", json=body, timeout=1)
        while _queue_depth(url) > 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        metrics = requests.get(url + "/metrics", timeout=30).text
        assert 'cloud_requests_total{endpoint="/v1/score",status="499"} 1.0' in metrics
    finally:
        proc.kill()
        proc.wait()


# A backend that answers every request at once, served with a body limit of 4096 bytes.
_SMALL_BODY_SERVER = _WAITING_SERVER.rsplit("sys.exit", 1)[0] + """
from cloud_jax.serving.types import ItemResult

class Answering(Waiting):
    def submit(self, items, settings):
        future = Future()
        future.set_result([ItemResult(0.5, [0.5], 0.0, ["ok"], [False]) for _ in items])
        return future

sys.exit(serve(Answering(), Settings(), None, port=int(sys.argv[1]), log_level="warning",
               max_body_bytes=4096))
"""


def test_a_request_body_over_the_limit_is_refused_before_it_is_read():
    """The body was read whole into memory whatever its size: a client could make the server
    hold gigabytes. A body past the limit (--max-body-mib) is a 413 naming the flag, at once from
    its Content-Length, or once that much of a chunked body has come."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_script_server(_SMALL_BODY_SERVER, port)
    try:
        # A terabyte announced, a few bytes sent: answered without waiting for the rest.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 1000000000000\r\n\r\n{\"items\": [")
            answer = b""
            while b"}" not in answer.partition(b"\r\n\r\n")[2]:
                chunk = conn.recv(65536)
                assert chunk, answer
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        error = json.loads(body)
        assert error["field"] == "body"
        assert "1000000000000 bytes" in error["error"] and "4096" in error["error"]
        assert "--max-body-mib" in error["error"]
        # Chunked, with no Content-Length: refused once more than the limit has come.
        big = json.dumps({"items": [{"prompt": "a" * 5000, "response": "b"}]}).encode()
        answer = requests.post(url + "/v1/score", data=iter([big[:3000], big[3000:]]),
                               headers={"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 413 and answer.json()["field"] == "body", answer.text
        # Within the limit, as before.
        small = {"items": [{"prompt": "a" * 3000, "response": "b"}]}
        answer = requests.post(url + "/v1/score", json=small, timeout=30)
        assert answer.status_code == 200, answer.text
        metrics = requests.get(url + "/metrics", timeout=30).text
        assert 'cloud_rejected_requests_total{reason="body_too_large"} 2.0' in metrics
        assert 'cloud_requests_total{endpoint="/v1/score",status="413"} 2.0' in metrics
    finally:
        proc.kill()
        proc.wait()


# The waiting backend, whose close says how it was asked to close and, asked to drain, waits for
# its requests (which never end) as a draining backend does.
_FORCE_QUIT_SERVER = _WAITING_SERVER.rsplit("sys.exit", 1)[0] + """
import threading

class Closing(Waiting):
    def close(self, drain=True):
        print(f"close drain={drain}", flush=True)
        if drain:
            threading.Event().wait()

sys.exit(serve(Closing(), Settings(), None, port=int(sys.argv[1]), log_level="info"))
"""


def test_a_second_ctrl_c_quits_without_draining():
    """While the server drains after Ctrl-C, uvicorn logs "Waiting for connections to close.
    (CTRL+C to force quit)"; a second Ctrl-C stopped uvicorn's wait, and then the server
    drained anyway, waiting for every queued critique. It closes the backend without draining."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_script_server(_FORCE_QUIT_SERVER, port, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        sender = threading.Thread(target=lambda: requests.post(
            url + "/v1/score", json={"items": [{"prompt": "a", "response": "b"}]}, timeout=60),
            daemon=True)
        sender.start()
        deadline = time.monotonic() + 60
        while _queue_depth(url) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # uvicorn waits for the request's connection
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "close drain=False" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


# The waiting backend run as the serve command runs (under run_command's SIGTERM handler), whose
# close, asked to drain, takes a while (a batch still running) and says when it is done.
_SLOW_DRAIN_SERVER = _WAITING_SERVER.rsplit("sys.exit", 1)[0] + """
import time
from cloud_jax.cli.common import run_command

class Draining(Waiting):
    def close(self, drain=True):
        print(f"close drain={drain}", flush=True)
        if drain:
            time.sleep(3)
            print("drained", flush=True)

sys.exit(run_command(lambda argv: serve(Draining(), Settings(), None, port=int(sys.argv[1]),
                                        log_level="warning"), []))
"""


def test_a_second_sigterm_while_draining_is_ignored():
    """A second SIGTERM while the backend drained (after uvicorn had answered its connections)
    reached the batch commands' handler: "run the same command again to resume" and status 75,
    the drain cut short. It is ignored, as during uvicorn's own wait: the drain ends, and the
    process exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DRAIN_SERVER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                requests.get(url + "/health", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "close drain=True"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read()
        assert "drained" in rest and "resume" not in rest, rest
    finally:
        proc.kill()
        proc.wait()


# The waiting backend, with a log handler that tries to connect when "ready on" is logged.
_READY_PROBE = _WAITING_SERVER.rsplit("sys.exit", 1)[0] + """
import logging, socket

host = sys.argv[2]

class Probe(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("ready on"):
            try:
                socket.create_connection((host, int(sys.argv[1])), timeout=5).close()
                print(message, "(accepting)", flush=True)
            except OSError as err:
                print(message, f"({err.strerror or err})", flush=True)

logging.getLogger("cloud_jax.serving.server").addHandler(Probe())
logging.getLogger("cloud_jax.serving.server").setLevel(logging.INFO)
sys.exit(serve(Waiting(), Settings(), None, host=host, port=int(sys.argv[1]),
               log_level="warning"))
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_ready_line_comes_once_connections_are_accepted_and_its_url_works(host):
    """"ready on http://..." was logged before the socket listened (a client that read it and
    connected at once was refused), and an IPv6 host was written without brackets
    (http://::1:8000, not a URL)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip(f"cannot bind {host} here")
    proc = subprocess.Popen([sys.executable, "-c", _READY_PROBE, str(port), host],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip()
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        assert line == f"ready on {url} (accepting)"
        assert requests.get(url + "/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["byte", "llama3", "chatml"])
def test_openrlhf_queries_reduce_to_the_user_text_and_the_response(name):
    """What OpenRLHF sends (the rendered chat, the EOS after it) is split into what the model was
    trained on; a rendered system message or earlier turn is refused, naming the query."""
    from test_data_layout import chatml_tokenizer, llama3_tokenizer

    from cloud_jax.data.tokenizer import byte_tokenizer
    from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf

    tok = {"byte": byte_tokenizer, "llama3": llama3_tokenizer, "chatml": chatml_tokenizer}[name]()
    markers = ChatMarkers.of(tok)

    def render(*messages, generation=False):
        return tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                       tokenize=False, add_generation_prompt=generation)

    prompt = render(("user", "What is 2+2?"), generation=True)
    query = render(("user", "What is 2+2?"), ("assistant", "4"))
    # OpenRLHF before 0.8 decodes its left- and right-padded batch whole: padding (its pad token
    # is the EOS where the tokenizer has none) before the prompt and after the EOS.
    pad = tok.pad_token or tok.eos_token
    padded = 2 * pad + query + tok.eos_token + 3 * pad
    for body in ({"query": [query + tok.eos_token]}, {"query": [query]},
                 {"query": [query + tok.eos_token], "prompts": [prompt]},
                 {"query": [padded]}, {"query": [padded], "prompts": [prompt]}):
        [item] = parse_openrlhf(body, markers)
        assert (item.prompt, item.response) == ("What is 2+2?", "4"), body
    for messages in ((("system", "Be terse."), ("user", "What is 2+2?"), ("assistant", "4")),
                     (("user", "Hi"), ("assistant", "Hello"), ("user", "What is 2+2?"),
                      ("assistant", "4"))):
        with pytest.raises(InvalidField, match="not one user turn") as err:
            parse_openrlhf({"query": [query, render(*messages)]}, markers)
        assert err.value.field == "query[1]"


# A Llama-3.2-style template: a system turn holding today's date opens every chat.
DATED_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + strftime_now('%d %b %Y')"
    " + '\n\n' + ns.system + '<|eot_id|>' }}"
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def test_openrlhf_queries_rendered_on_another_day_are_split():
    """A template that writes today's date: a query the client rendered on another day (the
    server started before midnight, or the client's clock differs) is split as one of today's.
    They were refused as "not one user turn"."""
    import datetime

    from test_data_layout import llama3_tokenizer

    from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf

    tok = llama3_tokenizer()
    tok.chat_template = DATED_TEMPLATE
    markers = ChatMarkers.of(tok)

    def render(*messages, generation=False):
        return tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                       tokenize=False, add_generation_prompt=generation)

    today = datetime.datetime.now()
    for other in (today + datetime.timedelta(days=1), datetime.datetime(1999, 1, 31)):
        def on_other_day(text):
            return text.replace(today.strftime("%d %b %Y"), other.strftime("%d %b %Y"))

        prompt = on_other_day(render(("user", "What is 2+2?"), generation=True))
        query = on_other_day(render(("user", "What is 2+2?"), ("assistant", "4")))
        assert other.strftime("%d %b %Y") in query
        for body in ({"query": [query + tok.eos_token]},
                     {"query": [query + tok.eos_token], "prompts": [prompt]}):
            [item] = parse_openrlhf(body, markers)
            assert (item.prompt, item.response) == ("What is 2+2?", "4"), body
        # A system message written after the date is still refused.
        system = on_other_day(render(("system", "Be terse."), ("user", "What is 2+2?"),
                                     ("assistant", "4")))
        with pytest.raises(InvalidField, match="not one user turn"):
            parse_openrlhf({"query": [system]}, markers)


def test_non_finite_rewards_are_a_clear_error(checkpoint, tmp_path):
    """A model whose reward head holds NaN: a 500 that says so (not a JSON encoder's crash),
    and the server keeps serving."""
    import jax
    import jax.numpy as jnp

    rm = cloud_jax.load(checkpoint)
    rm.params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, jnp.nan) if "reward" in jax.tree_util.keystr(path)
        else x, rm.params)
    rm.save_pretrained(tmp_path / "nan")
    s = Server(tmp_path / "nan", "--slots", "2", "--max-critique-tokens", "2")
    try:
        for path, body in (("/v1/score", {"items": [{"prompt": "a", "response": "b"}] * 2}),
                           ("/get_reward", {"query": ["<bos><|user|>a<eot><|assistant|>b<eot>"]})):
            answer = requests.post(s.url + path, json=body, timeout=60)
            assert answer.status_code == 500, answer.text
            assert "non-finite rewards (NaN or inf) for" in answer.json()["error"]
        assert requests.get(s.url + "/health", timeout=5).status_code == 200
    finally:
        s.stop()


def test_metrics_are_prometheus_text(server):
    # The requests whose metrics are looked for (the test passed only after others had made them).
    ok = {"items": [{"prompt": "a", "response": "b"}]}
    assert requests.post(server.url + "/v1/score", json=ok, timeout=60).status_code == 200
    bad = requests.post(server.url + "/v1/score", json={"items": []}, timeout=60)
    assert bad.status_code == 422
    text = requests.get(server.url + "/metrics", timeout=5).text
    for name in ("cloud_queue_depth", "cloud_busy_slots", "cloud_critique_tokens_total",
                 "cloud_request_latency_seconds_bucket", "cloud_rejected_requests_total",
                 "cloud_compiles_total", "cloud_compile_seconds_total"):
        assert name in text
    assert server.metric("cloud_critique_tokens_total") > 0


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_overload_then_sigterm_under_load(checkpoint, rm, batching):
    server = Server(checkpoint, "--slots", "1", "--max-queue", "3",
                    "--max-critique-tokens", "48", "--batching", batching)
    try:
        settings = {"num_samples": 1, "temperature": 1.0, "max_critique_tokens": 48, "seed": 1}
        body = {"items": [{"prompt": PROMPTS[0], "response": RESPONSES[0]}], **settings}
        offline = _offline(rm, PROMPTS[:1], RESPONSES[:1], **settings)

        def call(_):
            return requests.post(server.url + "/v1/score", json=body, timeout=120)

        # Overload: more at once than the queue holds.
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(24)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 3
        for a in answers:
            if a.status_code == 503:
                assert int(a.headers["Retry-After"]) >= 1
                assert "--max-queue" in a.json()["error"]
            else:
                _check(a.json()["results"][0], offline, 0)
        assert server.metric("cloud_rejected_requests_total") >= codes.count(503)

        # SIGTERM while requests are queued: each accepted one is answered, then exit 0.
        admitted_before = server.metric("cloud_admitted_items_total")
        results = []
        threads = [threading.Thread(target=lambda: results.append(call(0))) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while server.metric("cloud_admitted_items_total") < admitted_before + 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200, 200, 200]
        for r in results:
            _check(r.json()["results"][0], offline, 0)
        assert server.proc.wait(timeout=60) == 0
        # The server's log names the flag: clients such as OpenRLHF print only the status.
        assert "refused with 503: the queue holds 3 items waiting (--max-queue)" in \
            server.proc.stdout.read()
    finally:
        server.stop()


_SERVE_ON_TWO_DEVICES = """
import sys
import cloud_jax.serving.server as server
from cloud_jax.cli.serve import main

def serve(backend, *args, **kwargs):  # what would serve: the backend and its devices
    mesh = backend.rm.mesh
    print(type(backend).__name__, None if mesh is None else dict(mesh.shape))
    return 0

server.serve = serve
for batching in ("continuous", "static"):
    main(["--checkpoint", sys.argv[1], "--port", "0", "--batching", batching])
"""


def test_the_default_serve_command_runs_on_a_host_of_several_devices(checkpoint):
    # It was refused: "--batching continuous runs on one device; with --mesh over 2 devices use
    # --batching static", though no --mesh was given.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SERVE_ON_TWO_DEVICES, str(checkpoint)],
                          env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "ContinuousBackend None", "StaticBackend {'data': 2, 'fsdp': 1, 'tensor': 1}"]


def test_serve_builds_its_backend_with_the_warmup_asked_for(checkpoint, monkeypatch):
    import cloud_jax.serving.server as server_module
    from cloud_jax.cli.serve import main

    built = []
    monkeypatch.setattr(server_module, "serve",
                        lambda backend, *args, **kwargs: built.append(backend.options.warmup) or 0)
    for argv in (["--warmup", "buckets"], ["--batching", "static", "--warmup", "buckets"], []):
        assert main(["--checkpoint", str(checkpoint), "--port", "0", *argv]) == 0
    assert built == ["buckets", "buckets", "request"]
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", str(checkpoint), "--warmup", "all"])
    assert err.value.code == 2


def test_sigterm_while_the_server_loads_or_compiles_exits_0(checkpoint, rm, monkeypatch, caplog):
    """SIGTERM before the server listened (loading the model, compiling) was taken as a
    preempted batch command's: status 75 and "run the same command again to resume", where a
    server stops with status 0 after SIGTERM (docs/SERVING.md). It now stops there, logs that
    nothing was accepted, and exits 0, as it does once it serves."""
    import cloud_jax.cli.serve as serve_cli
    from cloud_jax.cli.common import run_command

    argv = ["--checkpoint", str(checkpoint), "--port", "0"]

    def sigterm_then_wait(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the server")

    monkeypatch.setattr(serve_cli, "load_model", sigterm_then_wait)
    with caplog.at_level(logging.WARNING, "cloud_jax.serving.server"):
        assert run_command(serve_cli.main, argv) == 0
    assert "stopped by SIGTERM while loading and compiling, before listening" in caplog.text

    closed = []

    class Compiling:  # SIGTERM while its start() compiles
        start = staticmethod(sigterm_then_wait)

        def close(self, drain=True):
            closed.append(drain)

    monkeypatch.setattr(serve_cli, "load_model", lambda *args, **kwargs: rm)
    monkeypatch.setattr(serve_cli, "make_backend", lambda *args, **kwargs: Compiling())
    caplog.clear()
    with caplog.at_level(logging.WARNING, "cloud_jax.serving.server"):
        assert run_command(serve_cli.main, argv) == 0
    assert closed == [False]  # nothing accepted: nothing to drain
    assert "stopped by SIGTERM while loading and compiling, before listening" in caplog.text


def test_a_request_that_picks_top_p_or_top_k_replaces_the_servers_default_of_the_other():
    """top_k and top_p are two ways to cut the distribution, one at a time: a request that picks
    one replaces the server's default of the other. A server started with --top-k refused every
    request that set top_p, naming top_k, a field the request did not hold."""
    from cloud_jax.serving.protocol import InvalidField, check_settings, parse_score
    from cloud_jax.serving.types import BackendOptions, Settings

    item = [{"prompt": "a", "response": "b"}]
    for defaults, request, expected in (
            (Settings(temperature=0.7, top_k=5), {"top_p": 0.9}, (None, 0.9)),
            (Settings(temperature=0.7, top_p=0.9), {"top_k": 3}, (3, None)),
            (Settings(temperature=0.7, top_k=5), {}, (5, None)),
            (Settings(temperature=0.7, top_k=5), {"top_k": None}, (None, None)),
            (Settings(temperature=0.7, top_k=5), {"top_p": None}, (5, None))):
        _, settings = parse_score({"items": item, **request}, defaults)
        assert (settings.top_k, settings.top_p) == expected, (defaults, request)
        check_settings(settings, BackendOptions(defaults=defaults), False)
    # Both in one request is still refused, naming the request's own fields.
    _, settings = parse_score({"items": item, "top_k": 3, "top_p": 0.9}, Settings(temperature=1))
    with pytest.raises(InvalidField, match="not both"):
        check_settings(settings, BackendOptions(), False)


def test_openrlhf_requests_refuse_the_settings_they_would_not_apply():
    """/get_reward scores with the server's defaults: a sampling setting sent there (as to
    /v1/score) was accepted and ignored without a word. It is a 422 naming it; the fields OpenRLHF
    sends, and others it may add, are still accepted."""
    from cloud_jax.data.tokenizer import byte_tokenizer
    from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf

    markers = ChatMarkers.of(byte_tokenizer())
    query = "<bos><|user|>a<eot><|assistant|>b<eot>"
    for name, value in (("num_samples", 4), ("temperature", 0.7), ("top_p", 0.9),
                        ("max_critique_tokens", 8), ("seed", 1), ("repetition_penalty", 1.01),
                        ("top_k", None)):
        with pytest.raises(InvalidField, match="/v1/score") as err:
            parse_openrlhf({"query": [query], name: value}, markers)
        assert err.value.field == name
    [item] = parse_openrlhf({"query": [query], "prompts": None, "labels": ["x"],
                             "datasource": ["gsm8k"]}, markers)
    assert (item.prompt, item.response) == ("a", "b")


def test_every_serve_flag_has_help_that_gives_its_default():
    """--top-k, --top-p, --seed and --log-level were listed by --help with no word on what they
    do or their default."""
    import argparse

    from cloud_jax.cli.serve import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        if action.default not in (None, argparse.SUPPRESS) and not action.required:
            assert "%(default)s" in action.help or str(action.default) in action.help, \
                action.option_strings


def test_a_message_key_the_layout_has_no_place_for_is_refused():
    """/v1/score refuses unknown fields; a prompt message's own (a speaker's "name") was
    accepted and dropped from what the model read."""
    from cloud_jax.serving.protocol import InvalidField, parse_score
    from cloud_jax.serving.types import Settings

    with pytest.raises(InvalidField, match="unknown field") as err:
        parse_score({"items": [{"prompt": [{"role": "user", "content": "a", "name": "Ann"}],
                                "response": "b"}]}, Settings())
    assert err.value.field == "items[0].prompt[0].name"
    [item], _ = parse_score({"items": [{"prompt": [{"role": "user", "content": "a"}],
                                        "response": "b"}]}, Settings())
    assert item.prompt == [{"role": "user", "content": "a"}]


def test_a_prompt_message_whose_content_is_text_parts_is_read_as_its_text():
    """/v1/score takes a user message's content as a list of text parts (OpenAI's form), read
    joined as the string; a part that is not text is a 422 naming it (it was refused as not a
    message list)."""
    from cloud_jax.serving.protocol import InvalidField, parse_score, prompt_text
    from cloud_jax.serving.types import Settings

    content = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    [item], _ = parse_score({"items": [{"prompt": [{"role": "user", "content": content}],
                                        "response": "4"}]}, Settings())
    assert prompt_text(item.prompt) == "What is 2+2?"
    with pytest.raises(InvalidField, match="a part of type 'image_url'") as err:
        parse_score({"items": [{"prompt": [{"role": "user", "content": content + [
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
                                "response": "4"}]}, Settings())
    assert err.value.field == "items[0].prompt[0].content[2]"


def test_an_empty_prompts_list_beside_queries_is_named_as_a_count_that_differs():
    """/get_reward with "prompts": [] and queries answered "prompts: must not be empty", as if
    prompts were required; what is wrong is that there is not one per query."""
    from cloud_jax.data.tokenizer import byte_tokenizer
    from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf

    markers = ChatMarkers.of(byte_tokenizer())
    with pytest.raises(InvalidField, match=r"^prompts: 0 prompts for 1 queries: give one per "
                                           r"query, or none") as err:
        parse_openrlhf({"query": ["ab"], "prompts": []}, markers)
    assert err.value.field == "prompts"
    assert parse_openrlhf({"query": [], "prompts": [], "labels": []}, markers) == []


def test_the_metrics_that_count_since_start_are_counters():
    """cloud_critique_tokens_total, cloud_compiles_total and cloud_compile_seconds_total only
    grow (docs/SERVING.md: rate() of the first is tokens/s), as _total names promise; they were
    exported with the type gauge, which Prometheus tools take for a value that goes up and down."""
    from prometheus_client.parser import text_string_to_metric_families

    from cloud_jax.serving.server import Metrics
    from cloud_jax.serving.types import BackendStats

    class Backend:
        def stats(self):
            return BackendStats(queue_depth=2, busy_slots=3, total_slots=4, critique_tokens=70,
                                compiles=1, compile_seconds=2.5)

    metrics = Metrics(Backend())
    metrics.requests.labels("/v1/score", "200").inc()
    metrics.rejected.labels("invalid").inc()
    metrics.admitted.inc()
    metrics.items.inc()
    metrics.latency.labels("/v1/score").observe(0.1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    types = {name: f.type for name, f in families.items()}
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    for name in ("cloud_critique_tokens", "cloud_compiles", "cloud_compile_seconds",
                 "cloud_requests", "cloud_rejected_requests", "cloud_admitted_items",
                 "cloud_scored_items"):
        assert types.get(name) == "counter", (name, types)
    for name in ("cloud_queue_depth", "cloud_busy_slots", "cloud_total_slots"):
        assert types.get(name) == "gauge", (name, types)
    assert types.get("cloud_request_latency_seconds") == "histogram"
    assert (samples["cloud_critique_tokens_total"], samples["cloud_compiles_total"],
            samples["cloud_compile_seconds_total"]) == (70, 1, 2.5)
    assert (samples["cloud_queue_depth"], samples["cloud_busy_slots"],
            samples["cloud_total_slots"]) == (2, 3, 4)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_openrlhf_queries_whose_prompt_was_cut_from_the_left_are_split(name):
    """OpenRLHF 0.10+ keeps the last tokens of a prompt too long for its max_len, decodes them
    with the response as the query, and sends the whole prompt in prompts: the query starts with
    an end of the prompt. Such queries were a 422 ("does not start with its prompt"), and
    OpenRLHF dropped the sample's reward. The response is what follows that end (a cut through a
    character's bytes decodes to U+FFFD first), the user's text the whole prompt's; a query that
    starts with no end of its prompt is still refused."""
    from test_data_layout import chatml_tokenizer, llama3_tokenizer

    from cloud_jax.serving.protocol import ChatMarkers, InvalidField, parse_openrlhf

    tok = {"llama3": llama3_tokenizer, "chatml": chatml_tokenizer}[name]()
    markers = ChatMarkers.of(tok)
    question, answer = "Price in € of one apple, then what is 2+2?", "It is 4."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    conversation = tok.apply_chat_template([{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}],
                                           tokenize=False)
    assert conversation.startswith(prompt)
    action_ids = tok(conversation[len(prompt):], add_special_tokens=False)["input_ids"]
    action_ids = action_ids + [tok.eos_token_id]
    through_euro = 0
    for kept in range(len(prompt_ids) - 1, 0, -1):
        query = tok.decode(prompt_ids[-kept:] + action_ids, skip_special_tokens=False)
        assert not query.startswith(prompt)
        through_euro += query.startswith("\ufffd")  # a cut inside the bytes of the "€"
        [item] = parse_openrlhf({"query": [query], "prompts": [prompt], "labels": [""]}, markers)
        assert (item.prompt, item.response) == (question, answer), (kept, query)
    assert through_euro
    # A query of another prompt, or of none, starts with no end of this one.
    other = tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": answer}], tokenize=False)
    for query in (other, "x" + prompt + answer, answer):
        with pytest.raises(InvalidField, match="does not start with its prompt") as err:
            parse_openrlhf({"query": [query], "prompts": [prompt]}, markers)
        assert err.value.field == "query[0]"
