"""The OpenAI API subset of `minilm serve`: request bodies checked field by field, response shapes.

    body = parse_body(raw_bytes)                                  # ApiError 400 unless a JSON object
    req = parse_chat(body, tokenizer, context=256)                # or parse_completion(...)
    completion(req.kind, "chatcmpl-1", "sft", "Hi!", "stop", usage(12, 4))

Every bad input raises `ApiError(status, message)`, which the server turns into OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`: a client library shows the message, and the
server goes on. Fields are checked by hand rather than by a pydantic model, so each message can say
what was wrong and what is allowed (pydantic's 422 lists would be a second error format).

Supported: messages (roles system/user/assistant; content a string or a list of text parts), prompt
(one string), max_tokens (or max_completion_tokens), temperature, top_p, stop, stream,
stream_options.include_usage, seed, n=1. Other fields (model, user, ...) are accepted and ignored:
one model is served. Text from a client is always encoded as plain text (chat_cli's rendering), so
"<|end|>" typed by a user is characters, never the special token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from minilm.chat_cli import render_conversation
from minilm.serve.worker import Sampling

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str                # "chat" or "text"
    prompt: list[int]        # token ids the reply continues
    sampling: Sampling
    stream: bool
    include_usage: bool      # streamed: one last chunk with the token counts


def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _bad(name: str, message: str) -> ApiError:
    return ApiError(400, f"'{name}' {message}", param=name)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, and JSON's true is not a number
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a finite number, got {value!r}")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(name, f"must be an integer, got {value!r}")
    return value


def _sampling(body: dict, prompt_len: int, context: int) -> Sampling:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"must be >= 0 (0: greedy), got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"must be in (0, 1], got {top_p}")
    if (n := _integer(body, "n")) not in (None, 1):
        raise _bad("n", f"must be 1 (one reply per request), got {n}")
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    room = context - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {context} tokens "
                            f"and leaves no room for a reply. Shorten the messages", code="context_length_exceeded")
    max_tokens = _integer(body, name)
    if max_tokens is None:
        max_tokens = room   # OpenAI's default: whatever the context has left
    elif max_tokens < 1:
        raise _bad(name, f"must be >= 1, got {max_tokens}")
    elif max_tokens > room:
        raise ApiError(400, f"the prompt ({prompt_len} tokens) + {name} ({max_tokens}) exceeds the model's "
                            f"{context}-token context; ask for at most {room} tokens or shorten the prompt",
                       param=name, code="context_length_exceeded")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad("seed", f"must be from 0 to 2**63 - 1, got {seed}")
    return Sampling(max_tokens, temperature, top_p, _stop(body), seed)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"must be a string or a list of at most 4 strings, got {stop!r}")
    return tuple(s for s in stops if s)


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream, options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {stream!r}")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", f"must be an object like {{\"include_usage\": true}}, got {options!r}")
    return stream, bool(options.get("include_usage"))


def _content(i: int, content) -> str:
    """A message's text: a string, or OpenAI's list of parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content", f"must be a string or a list of text parts, got {content!r}"[:300])


def parse_chat(body: dict, tokenizer, context: int) -> Request:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}]", f"must be an object with 'role' one of {', '.join(ROLES)}; got {m!r}"[:300])
        clean.append({"role": m["role"], "content": _content(i, m.get("content"))})
    if clean[-1]["role"] == "assistant":
        raise _bad("messages", "must not end with an assistant message: the reply is the assistant's turn")
    prompt = render_conversation(tokenizer, clean)
    return Request("chat", prompt, _sampling(body, len(prompt), context), *_streaming(body))


def parse_completion(body: dict, tokenizer, context: int) -> Request:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:   # the client's batch form, with one prompt
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", f"must be a string (one prompt per request), got {prompt!r}"[:300])
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]   # plain text; an empty prompt starts a document
    return Request("text", ids, _sampling(body, len(ids), context), *_streaming(body))


# ---- response shapes ----

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(kind: str, id: str, model: str, created: int, text: str, finish: str, counts: dict) -> dict:
    """The whole reply: a chat.completion or a text_completion object."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": counts}


def chunk(kind: str, id: str, model: str, created: int, text: str | None, finish: str | None = None,
          counts: dict | None = None) -> dict:
    """One streamed event: a piece of text, the finish reason, or (choices empty) the usage."""
    if counts is not None:
        choices = []
    elif kind == "chat":   # the first chunk carries the role, later ones only content
        delta = {} if text is None else {"content": text}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model, "choices": choices}
    if counts is not None:
        out["usage"] = counts
    return out
