"""`minilm serve`'s page in a real browser: type a message, watch the reply stream in, reset, read
the report tab; nothing is fetched from another host.

Debian's chromium (`apt-get install chromium`) is driven by Playwright's Python package; the test
skips, saying why, when either is missing (never `playwright install`: it downloads a browser).
The model's sampling is replaced by a scripted reply with a pause between tokens, so the page is
checked against known text arriving in known pieces; the server, its queue and the page are real.
A screenshot goes to tmp_path.

    pytest tests/test_serve_browser.py -q
"""

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("fastapi", reason="minilm serve needs fastapi: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="minilm serve needs uvicorn: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")

from minilm.checkpoint import save_checkpoint
from minilm.model import Phi3
from minilm.serve import create_app
from minilm.serve import worker as worker_module
from minilm.serve.app import bind
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_12

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPLY = "Hello there, the quick brown fox!"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """uvicorn in a thread serving a tiny checkpoint and a run folder; yields (base url, tokenizer)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium at /usr/bin/chromium (apt-get install chromium)")
    tok = Tokenizer.train([REPLY * 5, "def main(): return 0\n" * 5], 290, progress=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ck", Phi3(tiny_config(vocab_size=290, max_seq_len=128)), tok,
                           meta={"stage": "sft"})
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "lessons" / "figures" / "12_speedrun_dag.png",
                run / "report" / "dag.png")
    (run / "report.md").write_text("# A run\n\n| stage | time |\n|---|---:|\n| sft | 1.0 s |\n\n"
                                   "![the stages](report/dag.png)\n")

    def scripted(model, prompt, max_new_tokens, *args):   # REPLY token by token, then <|end|>
        for t in (tok.encode(REPLY) + [tok.special_id("<|end|>")])[:max_new_tokens]:
            time.sleep(0.03)
            yield t
    monkeypatch.setattr(worker_module, "stream", scripted)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(ckpt, run_dir=run), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", tok
    server.should_exit = True
    thread.join(timeout=10)


def test_the_page_streams_a_reply_resets_and_shows_the_report(server, tmp_path):
    base, tok = server
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as e:  # noqa: BLE001 (a chromium that cannot start here: say so, do not fail)
            pytest.skip(f"chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 900, "height": 640})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('128-token context')")
        # count every change to the log's text: a streamed reply arrives as many pieces
        page.evaluate("""() => { window.changes = 0;
            new MutationObserver((records) => { window.changes += records.length; })
              .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#message", "What is 2 + 3? <|end|>")
        page.keyboard.press("Enter")
        reply = page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30_000)
        assert reply.text_content() == REPLY
        assert page.text_content(".msg.user") == "What is 2 + 3? <|end|>"
        assert page.evaluate("window.changes") >= len(tok.encode(REPLY)) // 2   # piece by piece
        page.screenshot(path=str(tmp_path / "serve.png"))

        page.fill("#message", "And again?")
        page.keyboard.press("Enter")
        page.locator(".msg.assistant[data-state='done']").nth(1).wait_for(timeout=30_000)
        page.click("#reset")
        assert page.query_selector_all(".msg") == []

        page.click("#tab-report")
        page.wait_for_selector("#report table")
        assert page.evaluate("document.querySelector('#report img').naturalWidth") > 0   # the plot loaded
        assert page.is_hidden("#chat")
        browser.close()
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert requests and all(url.startswith(base + "/") for url in requests), requests
