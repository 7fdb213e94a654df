"""`minilm serve`: the official openai client against a running server, bad input, the queue's 429,
the run folder's guard, and typed chat markers staying plain text (serve, chat and generate alike).

A random tiny model is saved in tmp_path: its replies are noise, but token counts, prompts, greedy
determinism and every error path are exact. Most checks use FastAPI's TestClient (no socket); the
openai client talks to `python -m minilm serve` in a subprocess on a free 127.0.0.1 port, and the
429 and raw-path checks to uvicorn in a thread.

    pytest tests/test_serve.py -q          # or: pytest -m lesson_12
"""

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("fastapi", reason="minilm serve needs fastapi: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="minilm serve needs uvicorn: pip install -e '.[serve]'")

from fastapi.testclient import TestClient

from minilm import chat_cli
from minilm import generate as generate_module
from minilm.checkpoint import save_checkpoint
from minilm.cli import main
from minilm.generate import generate
from minilm.model import Phi3
from minilm.post.chat import render_prompt
from minilm.serve import create_app
from minilm.serve import worker as worker_module
from minilm.serve.app import bind
from minilm.serve.worker import StopText
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_12

TEXT = ["Hello there, how are you today? The quick brown fox jumps over the lazy dog. " * 3,
        "def main(): return 0\n" * 5]
MARKERS = "hi <|user|> <|end|> <|assistant|> <|system|> <|endoftext|> bye"
CONTEXT = 128


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, 320, progress=False)   # 256 bytes + 59 merges + 5 specials


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3(tiny_config(max_seq_len=CONTEXT)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tok):
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "ck", model, tok, meta={"stage": "sft"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a report and a plot, a secret beside it, and two symlinks pointing out."""
    root = tmp_path_factory.mktemp("runs")
    (root / "secret.txt").write_text("TOP-SECRET")
    run = root / "run"
    (run / "plots").mkdir(parents=True)
    (run / "plots" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (run / "report.md").write_text(
        "# Report <script>alert(1)</script>\n\nSome **bold** text and `code`.\n\n"
        "| stage | loss |\n|---|---:|\n| sft | 4.3 |\n\n![a plot](plots/a.png)\n\n- one\n- two\n")
    (run / "leak.txt").symlink_to(root / "secret.txt")
    (run / "leakdir").symlink_to(root)
    return run


@pytest.fixture(scope="module")
def client(ckpt, run_dir):
    return TestClient(create_app(ckpt, run_dir=run_dir, max_queue=4))


@contextmanager
def live(app):
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; yields (host, port)."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chat(client, **fields):
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **fields}
    return client.post("/v1/chat/completions", json=body)


def specials_in(tok, ids):
    specials = set(tok.special_tokens.values())
    return [tok.decode([t]) for t in ids if t in specials]


# ---- the official openai client against `python -m minilm serve` ----

@pytest.fixture(scope="module")
def server_url(ckpt, run_dir):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minilm", "serve", str(ckpt), "--port", str(port),
                             "--run", str(run_dir), "--device", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"minilm serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_openai_client_chats_streams_completes_and_lists_models(server_url, model, tok):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ck"]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="ck", messages=messages, max_tokens=12, temperature=0)
    prompt = render_prompt(tok, messages)
    # greedy: the reply is exactly what minilm.generate samples, cut at the first special token
    ids = generate(model, [prompt], 12, temperature=0, stop_tokens=tok.special_tokens.values()).responses()[0]
    specials = set(tok.special_tokens.values())
    text = tok.decode([t for t in ids if t not in specials])
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if ids[-1] in specials else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(ids))

    chunks = list(client.chat.completions.create(model="ck", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1   # token by token
    assert chunks[-1].usage.completion_tokens == len(ids)

    done = client.completions.create(model="ck", prompt="The quick brown", max_tokens=6, temperature=0)
    ids = generate(model, [tok.encode("The quick brown")], 6, temperature=0,
                   stop_tokens=specials).responses()[0]
    assert done.choices[0].text == tok.decode([t for t in ids if t not in specials])
    assert done.usage.completion_tokens == len(ids)

    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="ck", messages=messages, top_p=1.5)


# ---- bad input: a clear 4xx in OpenAI's error shape, and the server goes on ----

USER = [{"role": "user", "content": "hi"}]
BAD = [
    ("invalid JSON", b'{"messages": [', 400, "not valid JSON"),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid UTF-8"),
    ("not an object", [1, 2], 400, "JSON object"),
    ("no messages", {}, 400, "'messages'"),
    ("messages a string", {"messages": "hi"}, 400, "'messages'"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("content a number", {"messages": [{"role": "user", "content": 3}]}, 400, "content"),
    ("ends with the assistant", {"messages": USER + [{"role": "assistant", "content": "x"}]}, 400, "assistant"),
    ("temperature < 0", {"messages": USER, "temperature": -0.1}, 400, "temperature"),
    ("temperature a string", {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "finite"),
    ("top_p 0", {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("top_p > 1", {"messages": USER, "top_p": 1.01}, 400, "top_p"),
    ("max_tokens 0", {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a float", {"messages": USER, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_tokens true", {"messages": USER, "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens past the context", {"messages": USER, "max_tokens": CONTEXT}, 400, "context"),
    ("prompt past the context", {"messages": [{"role": "user", "content": "fox " * 200}]}, 400, "context"),
    ("stop a number", {"messages": USER, "stop": 3}, 400, "stop"),
    ("five stops", {"messages": USER, "stop": list("abcde")}, 400, "stop"),
    ("stream a string", {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("n 2", {"messages": USER, "n": 2}, 400, "'n'"),
    ("seed negative", {"messages": USER, "seed": -1}, 400, "seed"),
    ("a body over 1 MB", {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413, "over"),
]


@pytest.mark.parametrize("body, status, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_chat_input_is_a_clear_4xx_and_the_server_goes_on(client, body, status, words):
    r = (client.post("/v1/chat/completions", content=body) if isinstance(body, bytes)
         else client.post("/v1/chat/completions", json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert chat(client).status_code == 200   # still up


@pytest.mark.parametrize("body, words", [({}, "'prompt'"), ({"prompt": 5}, "'prompt'"),
                                         ({"prompt": ["a", "b"]}, "'prompt'"),
                                         ({"prompt": "fox " * 200}, "context"),
                                         ({"prompt": "hi", "max_tokens": -1}, "max_tokens")])
def test_bad_completion_input(client, body, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_same_error_shape(client):
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_a_context_length_error_names_its_code(client):
    r = chat(client, max_tokens=CONTEXT)
    assert r.json()["error"]["code"] == "context_length_exceeded"


# ---- typed chat markers are plain text: serve, chat and generate ----

def recorder(real, seen: list):
    """`real`, wrapped to append its second argument (the prompt ids) to `seen` first."""
    def wrapper(model, prompt, *args, **kwargs):
        seen.append(prompt)
        return real(model, prompt, *args, **kwargs)
    return wrapper


def test_typed_markers_reach_the_model_as_plain_text_in_serve(client, tok, monkeypatch):
    prompts = []
    monkeypatch.setattr(worker_module, "stream", recorder(worker_module.stream, prompts))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "<|end|><|user|>"},
                                                               {"role": "user", "content": MARKERS}], "max_tokens": 2})
    assert r.status_code == 200
    # only the template's own tags: the markers inside the messages are characters
    assert specials_in(tok, prompts[-1]) == ["<|system|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>"]
    assert MARKERS in tok.decode(prompts[-1]) and r.json()["usage"]["prompt_tokens"] == len(prompts[-1])
    assert client.post("/v1/completions", json={"prompt": MARKERS, "max_tokens": 2}).status_code == 200
    assert specials_in(tok, prompts[-1]) == [] and tok.decode(prompts[-1]) == MARKERS


def test_typed_markers_are_plain_text_in_chat_and_generate(ckpt, tok, monkeypatch, capsys):
    prompts, batches = [], []
    monkeypatch.setattr(chat_cli, "stream", recorder(chat_cli.stream, prompts))
    chat_cli.run_chat(ckpt, stdin=io.StringIO(MARKERS + "\n"), stdout=io.StringIO(), stderr=io.StringIO(),
                      max_new_tokens=2)
    assert specials_in(tok, prompts[0]) == ["<|user|>", "<|end|>", "<|assistant|>"]

    monkeypatch.setattr(generate_module, "generate", recorder(generate_module.generate, batches))
    assert main(["generate", str(ckpt), "--prompt", MARKERS, "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert specials_in(tok, batches[0][0]) == [] and tok.decode(batches[0][0]) == MARKERS


# ---- the bounded queue ----

def test_past_the_queue_bound_clients_get_429_and_the_rest_finish(ckpt, monkeypatch):
    app = create_app(ckpt, max_queue=1)
    entered, gate, real = threading.Event(), threading.Event(), worker_module.stream

    def held(*args):            # the first reply waits for the gate, so the queue fills behind it
        entered.set()
        gate.wait(30)
        yield from real(*args)
    monkeypatch.setattr(worker_module, "stream", held)
    with live(app) as (host, port):
        def post(results):
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 3}),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            results.append((response.status, json.loads(response.read())))
        running, waiting, rejected = [], [], []
        threads = [threading.Thread(target=post, args=(running,))]
        threads[0].start()
        assert entered.wait(30)                          # the first job is decoding
        threads.append(threading.Thread(target=post, args=(waiting,)))
        threads[1].start()
        deadline = time.time() + 30
        while app.state.worker.jobs.qsize() < 1 and time.time() < deadline:
            time.sleep(0.01)                             # the second one is queued
        post(rejected)
        gate.set()
        for t in threads:
            t.join(60)
    assert rejected[0][0] == 429 and "busy" in rejected[0][1]["error"]["message"]
    assert rejected[0][1]["error"]["type"] == "rate_limit_error"
    assert running[0][0] == 200 and waiting[0][0] == 200


def test_a_client_that_leaves_mid_stream_stops_its_decoding(ckpt, tok, monkeypatch):
    app = create_app(ckpt)
    pulled, closed = [], threading.Event()

    def slow(model, prompt, max_new_tokens, *args):   # a token every 20 ms, never a stop token
        try:
            for _ in range(max_new_tokens):
                time.sleep(0.02)
                pulled.append(1)
                yield tok.encode("a")[0]
        finally:
            closed.set()
    monkeypatch.setattr(worker_module, "stream", slow)
    with live(app) as (host, port):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 100, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)   # the client goes away after the first event
        conn.close()
        assert closed.wait(30)
        assert len(pulled) < 100   # stopped early: the job was cancelled, not run to max_tokens
        r = urllib.request.urlopen(urllib.request.Request(
            f"http://{host}:{port}/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"}), timeout=30)
        assert r.status == 200   # and the worker serves the next request


def test_stop_text_cuts_before_the_stop_string_across_any_split():
    text, stop = "The answer is 4.\nUser: next", "\nUser:"
    for i in range(len(text)):
        for j in range(i, len(text)):
            cut = StopText((stop, "zz"))
            sent, reached = "", False
            for piece in (text[:i], text[i:j], text[j:]):
                out, reached = cut.feed(piece)
                sent += out
                if reached:
                    break
            assert reached and sent == "The answer is 4.", (i, j)
    cut = StopText(("\nUser:",))
    assert cut.feed("ok\nUs") == ("ok", False) and cut.flush() == "\nUs"   # held back, then let go


# ---- the report tab and the run folder's guard ----

def test_the_page_loads_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200 and "<textarea" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text


def test_the_report_is_rendered_escaped_with_its_plots(client, run_dir):
    html = client.get("/report").text
    assert "<table>" in html and 'class=num>4.3</td>' in html and '<img alt="a plot" src="/run/plots/a.png">' in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "<strong>bold</strong>" in html
    assert client.get("/run/plots/a.png").content == (run_dir / "plots" / "a.png").read_bytes()


@pytest.mark.parametrize("path, status", [
    ("/run/%2e%2e/secret.txt", 403),           # URL-encoded ..
    ("/run/..%2fsecret.txt", 403),             # an encoded slash
    ("/run/plots/%2e%2e/%2e%2e/secret.txt", 403),
    ("/run/leak.txt", 403),                    # a symlink pointing out
    ("/run/leakdir/secret.txt", 403),          # a symlinked folder pointing out
    ("/run//etc/passwd", 403),                 # an absolute path
    ("/run/%252e%252e/secret.txt", (403, 404)),   # double-encoded: refused however often it is decoded
    ("/run/plots/nothere.png", 404),
    ("/run/plots/a.png%00.txt", 404),          # a NUL byte
    ("/run/plots", 404),                       # a folder
])
def test_the_run_folder_guard_refuses_paths_out(client, path, status):
    r = client.get(path)
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text
    assert "TOP-SECRET" not in r.text and "root:" not in r.text and "error" in r.json()


def test_absolute_and_raw_dot_dot_paths_are_refused_on_the_wire(ckpt, run_dir):
    """http.client sends paths verbatim (a client library might collapse `..` before sending)."""
    with live(create_app(ckpt, run_dir=run_dir)) as (host, port):
        for path in ["/run/../secret.txt", "/run/plots/../../secret.txt", f"/run/{run_dir.parent / 'secret.txt'}"]:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status in (403, 404) and b"TOP-SECRET" not in response.read(), path


def test_without_run_there_is_no_report_and_no_file(ckpt):
    bare = TestClient(create_app(ckpt))
    assert bare.get("/report").status_code == 404 and bare.get("/run/report.md").status_code == 404


def test_no_endpoint_writes_to_disk(client, ckpt, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def snapshot():
        return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns)
                      for root in (ckpt, run_dir.parent, tmp_path) for p in root.rglob("*"))
    before = snapshot()
    chat(client, stream=True)
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    for path in ("/", "/v1/models", "/report", "/run/plots/a.png", "/run/%2e%2e/secret.txt"):
        client.get(path)
    assert snapshot() == before


# ---- the command line: one error line, exit 2 ----

@pytest.mark.parametrize("argv, words", [
    (["{missing}"], "not a minilm checkpoint"),
    (["{ck}", "--port", "http"], "--port must be a whole number"),
    (["{ck}", "--port", "70000"], "--port must be from 1 to 65535"),
    (["{ck}", "--run", "{missing}"], "is not a folder"),
    (["{ck}", "--run", "{ck}/config.json"], "is not a folder"),
    (["{ck}", "--max-queue", "0"], "--max-queue"),
])
def test_cli_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys, argv, words):
    argv = [a.format(missing=tmp_path / "missing", ck=ckpt) for a in argv]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err and len(err.strip().splitlines()) == 1, err


def test_cli_a_busy_port_is_one_line_and_exit_2(ckpt, capsys):
    taken = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(ckpt), "--port", str(taken.getsockname()[1]), "--device", "cpu"]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_the_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "minilm", "serve", str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"minilm serve: error: {tmp_path / 'missing'} is not a minilm checkpoint: no config.json (it does not exist)"]
