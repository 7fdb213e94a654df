"""`minilm chat CHECKPOINT`: a terminal chat with any checkpoint, its reply streamed token by token.

    minilm chat runs/sft-tiny/checkpoint --system "Answer briefly." --temperature 0.7
    printf 'What is 2 + 3?\nAnd 4 + 4?\n' | minilm chat runs/sft-tiny/checkpoint   # one message a line

    from minilm.chat_cli import run_chat
    turns = run_chat("runs/sft-tiny/checkpoint", stdin=io.StringIO("hi\n/reset\nhello\n"))

Each turn renders the whole conversation with Phi-3's chat template (minilm/post/chat.py), then
`minilm.generate.stream` samples the reply with the KV cache and `decode_stream` prints each piece
as soon as it is a complete character. The reply ends at the first special token, and
`parse_reply` reads it as everywhere else in minilm. When the conversation plus `max_new_tokens`
no longer fits the context, the oldest exchange is dropped (the system message stays). LoRA
adapters are merged into the weights (inference only needs W + s B A). Lesson 06 walks through it.

Commands: /reset (a new conversation), /system TEXT (set the system message; /system alone clears
it), /quit. Ctrl-D and Ctrl-C at the prompt leave; Ctrl-C during a reply stops it and forgets the
question. Notes and warnings go to stderr, the conversation to stdout. A checkpoint that was never
chat-tuned, or a tokenizer without the chat tokens, still chats, with a one-line warning.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from minilm import MinilmError
from minilm.config import ConfigError, check_values
from minilm.checkpoint import load_checkpoint
from minilm.generate import stream
from minilm.lora import adapter_names, merge_and_unload
from minilm.post.chat import parse_reply, render_prompt
from minilm.runtime import setup_runtime

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
NOT_CHAT_STAGES = (None, "pretrain")   # an import-hf checkpoint may be chat-tuned (Phi-3-mini-instruct)
HELP = "commands: /reset (new conversation), /system TEXT (set the system message), /quit"


@dataclass
class ChatConfig:
    system: str | None = None
    temperature: float = 0.7         # <= 0: greedy
    top_k: int | None = None
    top_p: float | None = 0.9
    max_new_tokens: int = 128        # the reply's budget; the prompt gets the rest of the context
    seed: int = 0

    def check(self) -> None:
        try:   # the same rules as every stage's sampling settings (minilm/config.py)
            check_values(max_new_tokens=self.max_new_tokens, top_k=self.top_k, top_p=self.top_p,
                         temperature=max(self.temperature, 0.0))   # <= 0 is greedy; nan stays nan
        except ConfigError as e:
            raise MinilmError(str(e)) from e


@dataclass
class Turn:
    user: str
    reply: str               # the reply's text, as it goes into the history
    prompt_tokens: int       # tokens the model read before replying (after any truncation)
    reply_tokens: int        # tokens generated, the stop token included
    ended: bool              # the reply closed its turn with <|end|>
    dropped: int             # exchanges dropped before this turn to fit the context


def decode_stream(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text of a token stream, piece by piece, each piece as soon as its characters are complete.

    After each token the piece is what `tokenizer.decode` of the ids so far adds to the text given
    out before, so the pieces join to exactly the decoded reply. Decoding each token alone would be
    wrong: one character's UTF-8 bytes can be split across tokens ("é" is C3 A9: two tokens if no
    merge joined them), which would print two U+FFFD, and a SentencePiece token's "▁" is a space only
    where it is not the reply's first character. A text that ends in U+FFFD is held back until the
    next token completes the character; bytes that can never make one still come out as U+FFFD
    (a SentencePiece byte run that turns out not to be UTF-8 becomes U+FFFD as a whole in `decode`,
    after its valid first bytes may have been given out: only such garbage can differ).
    """
    seen: list[int] = []
    sent = ""
    for t in ids:
        seen.append(t)
        text = tokenizer.decode(seen)   # decodes the whole reply again: a reply is short
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(seen) if seen else ""
    if len(text) > len(sent):
        yield text[len(sent):]


def render_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of `messages`, ready for the assistant's reply: Phi-3's template when the tokenizer
    has the chat tokens, else a plain 'User: / Assistant:' transcript. Message text is always encoded
    as plain text, so a typed "<|end|>" is characters, never the special token."""
    if all(t in tokenizer.special_tokens for t in CHAT_TOKENS):
        return render_prompt(tokenizer, messages)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return tokenizer.encode(text + "Assistant:")


def load_chat_model(checkpoint, device: str = "cpu") -> tuple[object, object, list[str]]:
    """(model, tokenizer, warnings) of a checkpoint on `device`, LoRA adapters merged, in eval mode."""
    ck = load_checkpoint(checkpoint, device=device)
    if ck.tokenizer is None:
        raise MinilmError(f"{checkpoint} has no tokenizer; chat needs one to turn text into tokens")
    if adapter_names(ck.model):
        merge_and_unload(ck.model)
    warnings = []
    if not all(t in ck.tokenizer.special_tokens for t in CHAT_TOKENS):
        warnings.append(f"warning: {checkpoint}'s tokenizer has no chat tokens {'/'.join(CHAT_TOKENS)}; "
                        f"using a plain 'User: / Assistant:' transcript, replies may run on")
    elif ck.meta.get("stage") in NOT_CHAT_STAGES:
        warnings.append(f"warning: {checkpoint} was not chat-tuned (stage {ck.meta.get('stage')!r}); "
                        f"it will continue your text rather than answer it")
    return ck.model.eval(), ck.tokenizer, warnings


class ChatSession:
    """The conversation so far and how to extend it by one reply (writing only to `out` and `err`)."""

    def __init__(self, model, tokenizer, cfg: ChatConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.context = model.config.max_seq_len
        self.budget = min(cfg.max_new_tokens, self.context // 2)  # leave the prompt some room
        self.templated = all(t in tokenizer.special_tokens for t in CHAT_TOKENS)
        self.stops = set(tokenizer.special_tokens.values())  # a reply ends at any special token
        device = next(model.parameters()).device
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.system = cfg.system
        self.reset()

    def reset(self) -> None:
        self.history: list[dict] = []  # user, assistant, user, assistant, ...
        self.warned_truncation = False

    def render(self, history: list[dict]) -> list[int]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
        return render_conversation(self.tokenizer, messages)

    def fit_prompt(self) -> tuple[list[int], int]:
        """(prompt ids, exchanges dropped): drop the oldest exchanges until prompt + budget fits."""
        dropped = 0
        ids = self.render(self.history)
        while len(ids) + self.budget > self.context and len(self.history) > 1:
            del self.history[:2]  # the oldest user message and the reply to it
            dropped += 1
            ids = self.render(self.history)
        return ids, dropped

    def reply(self, user: str, out, err) -> Turn | None:
        """Add `user`, stream the reply to `out`, keep both in the history; None if it cannot fit."""
        self.history.append({"role": "user", "content": user})
        prompt, dropped = self.fit_prompt()
        if len(prompt) + self.budget > self.context:
            self.history.pop()
            print(f"(that message needs {len(prompt)} prompt tokens; the {self.context}-token context "
                  f"keeps {self.budget} for the reply. Shorten it, or /system to a shorter one)", file=err)
            return None
        if dropped and not self.warned_truncation:
            print(f"(the conversation outgrew the {self.context}-token context: dropping the oldest "
                  f"turns from now on)", file=err)
            self.warned_truncation = True
        out.write("assistant: ")
        out.flush()
        ids: list[int] = []

        def until_stop():  # the reply's ids without the special token that ends it
            for t in stream(self.model, prompt, self.budget, self.cfg.temperature, self.cfg.top_k,
                            self.cfg.top_p, self.stops, self.generator):
                ids.append(t)
                if t not in self.stops:
                    yield t

        try:
            for piece in decode_stream(self.tokenizer, until_stop()):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            self.history.pop()
            print("\n(reply interrupted; that question is forgotten)", file=err)
            return None
        out.write("\n")
        text, ended = parse_reply(self.tokenizer, ids)
        if not self.templated:
            text = text.split("\nUser:")[0].strip()  # a plain transcript has no end token
        self.history.append({"role": "assistant", "content": text})
        return Turn(user, text, len(prompt), len(ids), ended, dropped)


def _read(stdin, out, interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D) or on Ctrl-C at the prompt."""
    try:
        if interactive:
            return input("user: ")  # the terminal echoes what is typed; readline edits it
        line = stdin.readline()
    except (EOFError, KeyboardInterrupt):
        out.write("\n")
        return None
    if not line:
        return None
    line = line.rstrip("\r\n")
    if "\ufffd" in line:
        out.write("(bytes that are not UTF-8 were replaced by \ufffd)\n")
    if line.strip():
        out.write(f"user: {line}\n")  # piped input is not echoed: write it, for a readable transcript
    return line


def run_chat(checkpoint, system: str | None = None, temperature: float = 0.7, top_k: int | None = None,
             top_p: float | None = 0.9, max_new_tokens: int = 128, seed: int = 0,
             stdin=None, stdout=None, stderr=None, device: str = "auto") -> list[Turn]:
    """Chat with `checkpoint` until /quit or end of input; returns every completed turn.
    device: auto (a GPU when torch sees one), cpu or cuda[:N]."""
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if hasattr(stdin, "reconfigure"):   # a stray invalid byte must not end the conversation
        stdin.reconfigure(errors="replace")
    cfg = ChatConfig(system, temperature, top_k, top_p, max_new_tokens, seed)
    cfg.check()
    model, tokenizer, warnings = load_chat_model(checkpoint, setup_runtime(device).device)
    session = ChatSession(model, tokenizer, cfg)
    for w in warnings:
        print(w, file=err)
    if session.budget < cfg.max_new_tokens:
        print(f"(max_new_tokens {cfg.max_new_tokens} -> {session.budget}: half the model's "
              f"{session.context}-token context, so the conversation keeps the other half)", file=err)
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            # optional, and local: importing it gives input() line editing and history (not on every OS)
            import readline  # noqa: F401
        except ImportError:
            pass
        print(f"minilm chat with {checkpoint} ({session.context}-token context). {HELP}", file=err)
    turns: list[Turn] = []
    while (line := _read(stdin, out, interactive)) is not None:
        command, _, arg = line.strip().partition(" ")
        if not command:
            continue
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=err)
        elif command == "/system":
            session.system = arg.strip() or None
            print(f"(system message {'set' if session.system else 'cleared'})", file=err)
        elif command.startswith("/") and len(command) > 1:
            print(f"(unknown command {command}) {HELP}", file=err)
        else:
            turn = session.reply(line.strip(), out, err)
            if turn is not None:
                turns.append(turn)
    return turns
