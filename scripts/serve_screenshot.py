"""The screenshot of `minilm serve` in lesson 12: the chat page of a real run, two questions answered.

    python scripts/serve_screenshot.py runs/speedrun-laptop lessons/figures/12_serve.png

Starts `python -m minilm serve RUN/sft/checkpoint --run RUN` on a free 127.0.0.1 port, opens the
page in Debian's chromium through Playwright (no browser download), asks two ladder questions with
temperature 0 (greedy: the same run gives the same replies), and saves the page as a 256-colour
PNG (tens of KB): the chat tab above the report tab. Needs `apt-get install chromium` and `pip install playwright`.
"""

import argparse
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image  # matplotlib's own dependency
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTIONS = ["What is 12 + 7?", "What is 3 * 4?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a speedrun folder (its sft/checkpoint is served)")
    parser.add_argument("out", help="the PNG to write")
    args = parser.parse_args()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen([sys.executable, "-m", "minilm", "serve", str(Path(args.run) / "sft" / "checkpoint"),
                               "--run", args.run, "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 820, "height": 480})
            page.goto(base + "/")
            page.wait_for_selector("#tab-report:not([hidden])")
            page.fill("#temperature", "0")
            for i, question in enumerate(QUESTIONS):
                page.fill("#message", question)
                page.keyboard.press("Enter")
                page.locator(".msg.assistant[data-state='done']").nth(i).wait_for(timeout=60_000)
            shots = [page.screenshot()]
            page.click("#tab-report")
            page.wait_for_selector("#report table")
            while not page.evaluate("() => [...document.images].every((i) => i.complete)"):
                page.wait_for_timeout(100)   # (wait_for_function would need eval, which the page's CSP forbids)
            shots.append(page.screenshot())
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    chat, report = (Image.open(io.BytesIO(png)).convert("RGB") for png in shots)
    both = Image.new("RGB", (chat.width, chat.height + report.height), "white")   # the two tabs, stacked
    both.paste(chat, (0, 0))
    both.paste(report, (0, chat.height))
    both.quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
