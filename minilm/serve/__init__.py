"""`minilm serve`: an OpenAI-compatible chat API and a chat page for any checkpoint (lesson 12).

    minilm serve runs/speedrun-laptop/sft/checkpoint --run runs/speedrun-laptop

app.py (routes, the server), api.py (request checks, response shapes), worker.py (the bounded
queue and the decoding thread), report.py (report.md as HTML, the run folder's files), page.html
(the page: plain HTML, CSS and JavaScript, nothing loaded from elsewhere). Needs FastAPI and
uvicorn: `pip install -e ".[serve]"`.
"""

from minilm.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
