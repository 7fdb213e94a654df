"""`minilm serve CHECKPOINT`: an OpenAI-compatible chat API and a chat page, on 127.0.0.1 by default.

    minilm serve runs/speedrun-laptop/sft/checkpoint --run runs/speedrun-laptop   # http://127.0.0.1:8000/
    app = create_app("runs/sft-tiny/checkpoint", run_dir=None, max_queue=16)       # a FastAPI app, for tests

Routes: POST /v1/chat/completions and /v1/completions (stream: server-sent events, one per piece of
text, then `data: [DONE]`), GET /v1/models, GET / (the page, minilm/serve/page.html), and with
--run: GET /report (RUN/report.md as HTML) and GET /run/PATH (files inside RUN only).

A request is read and checked (api.py), its prompt rendered with Phi-3's chat template (chat_cli's
render_conversation), then queued for the decoding thread (worker.py). The thread hands each piece
of the reply back to the event loop with `call_soon_threadsafe`; the handler streams it out or
gathers it. Bad input is a 4xx with OpenAI's error JSON; a full queue is a 429; the server goes on.
Nothing is written to disk. Binding anything but a loopback address prints a warning: the API has
no authentication.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from minilm import MinilmError
from minilm.chat_cli import load_chat_model
from minilm.checkpoint import read_config
from minilm.runtime import setup_runtime
from minilm.serve import api
from minilm.serve.report import SERVED, file_inside, markdown_to_html
from minilm.serve.worker import Busy, Worker

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 1 << 20   # bytes of a request body: far more than any context of ours holds
# the page may load only what this server sends: no CDN, no font, no request to another host
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self'; connect-src 'self'")


def model_id(checkpoint) -> str:
    """runs/speedrun-laptop/sft/checkpoint -> "sft": the folder that names the model."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def create_app(checkpoint, run_dir=None, max_queue: int = 16, device="cpu") -> FastAPI:
    model, tokenizer, warnings = load_chat_model(checkpoint, device)
    for w in warnings:
        print(w, file=sys.stderr)
    context, name = model.config.max_seq_len, model_id(checkpoint)
    worker = Worker(model, tokenizer, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="minilm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(api.ApiError)
    async def api_error(request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)   # unknown routes and methods, in the same error shape
    async def http_error(request, e: HTTPException):
        return JSONResponse(api.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def answer(request: Request, kind: str):
        raw = bytearray()
        async for part in request.stream():   # read at most MAX_BODY bytes, however long the body
            raw += part
            if len(raw) > MAX_BODY:
                raise api.ApiError(413, f"the request body is over {MAX_BODY:,} bytes; send a shorter conversation")
        body = api.parse_body(bytes(raw))
        parse = api.parse_chat if kind == "chat" else api.parse_completion
        req = parse(body, tokenizer, context)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(what, value):   # called on the worker thread: hand the event to this loop
            if not loop.is_closed():   # (closed only when the server is shutting down)
                loop.call_soon_threadsafe(events.put_nowait, (what, value))
        try:
            job = worker.submit(req.prompt, req.sampling, emit)
        except Busy as e:
            raise api.ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            return StreamingResponse(sse(req, job, events, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while (event := await events.get())[0] == "text":
                pieces.append(event[1])
        finally:
            job.cancelled.set()   # a client that left no longer needs its tokens
        if event[0] == "error":
            raise api.ApiError(500, event[1], type="server_error")
        counts = api.usage(len(req.prompt), job.completion_tokens)
        return api.completion(kind, rid, name, created, "".join(pieces), event[1], counts)

    async def sse(req, job, events, rid, created):
        """The reply as server-sent events: `data: {chunk}` per piece, the finish, then [DONE]."""
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        try:
            if req.kind == "chat":   # OpenAI's first chunk names the role
                first = api.chunk(req.kind, rid, name, created, "")
                first["choices"][0]["delta"]["role"] = "assistant"
                yield data(first)
            while (event := await events.get())[0] == "text":
                yield data(api.chunk(req.kind, rid, name, created, event[1]))
            if event[0] == "error":
                yield data(api.ApiError(500, event[1], type="server_error").body())
            else:
                yield data(api.chunk(req.kind, rid, name, created, None, finish=event[1]))
                if req.include_usage:
                    counts = api.usage(len(req.prompt), job.completion_tokens)
                    yield data(api.chunk(req.kind, rid, name, created, None, counts=counts))
            yield "data: [DONE]\n\n"
        finally:   # also when the client disconnects mid-stream: stop decoding for it
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "text")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "minilm",
                                            "context_length": context}]}

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/")
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    run = Path(run_dir) if run_dir else None

    @app.get("/report")
    async def report():
        if run is None or not (run / "report.md").is_file():
            raise api.ApiError(404, "no report: start the server with --run RUN_DIR (a folder holding report.md)",
                               type="not_found_error")
        text = (run / "report.md").read_text(encoding="utf-8", errors="replace")
        return HTMLResponse(markdown_to_html(text, lambda p: "/run/" + quote(p.removeprefix("./"))))

    @app.get("/run/{relative:path}")
    async def run_file(relative: str):
        if run is None:
            raise api.ApiError(404, "no run folder: start the server with --run RUN_DIR", type="not_found_error")
        try:
            path = file_inside(run, relative)
        except PermissionError as e:
            raise api.ApiError(403, str(e), type="permission_error") from None
        except FileNotFoundError as e:
            raise api.ApiError(404, str(e), type="not_found_error") from None
        return FileResponse(path, media_type=SERVED[path.suffix.lower()])

    return app


def _whole(value, flag: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise MinilmError(f"{flag} must be a whole number from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        raise MinilmError(f"{flag} must be from {low} to {high}, got {number}")
    return number


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a MinilmError saying why not (a busy port, an unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise MinilmError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    return sock


def serve(checkpoint, host: str = "127.0.0.1", port="8000", run_dir=None, max_queue="16",
          device: str = "auto") -> None:
    """Check the flags, load the model, and serve until Ctrl-C."""
    port, max_queue = _whole(port, "--port", 1, 65535), _whole(max_queue, "--max-queue", 1, 10_000)
    if run_dir is not None and not Path(run_dir).is_dir():
        raise MinilmError(f"--run {run_dir} is not a folder; give a run folder such as runs/speedrun-laptop")
    read_config(checkpoint)    # a wrong path is one error line, before anything is logged or bound
    sock = bind(host, port)    # a busy port, before the model loads
    app = create_app(checkpoint, run_dir, max_queue, setup_runtime(device).device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model "
              f"(there is no authentication)", file=sys.stderr)
    print(f"minilm serve: {model_id(checkpoint)} on http://{host}:{port}/ (API: /v1/chat/completions, "
          f"/v1/completions, /v1/models; Ctrl-C stops)", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
