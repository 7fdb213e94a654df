"""`minilm chat`: streaming equals batched generation, UTF-8 split across tokens, the chat loop.

The loop runs over a random tiny model saved in tmp_path, fed a scripted stdin (io.StringIO): its
replies are noise, but prompt lengths, history, truncation and commands are exact.

    pytest tests/test_chat_cli.py -q
"""

import io

import pytest
import torch
from conftest import tiny_config

from minilm import chat_cli
from minilm.chat_cli import decode_stream, load_chat_model, run_chat
from minilm.checkpoint import save_checkpoint
from minilm.cli import main
from minilm.generate import generate, stream
from minilm.model import Phi3
from minilm.post.chat import render_prompt
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_06

TEXT = ["Hello there, how are you today? The quick brown fox jumps over the lazy dog. " * 3,
        "héllo wörld, naïve café — 世界 🙂 " * 2, "def main(): return 0\n" * 5]
MULTIBYTE = "naïve café — 世界 🙂"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, 320, progress=False)  # 256 bytes + 59 merges + 5 specials


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3(tiny_config()).eval()  # vocab 320, context 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tok):
    return save_checkpoint(tmp_path_factory.mktemp("chat") / "ck", model, tok, meta={"stage": "sft"})


def chat(path, script, **kw):
    """run_chat over `script` (a string of lines): (turns, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    turns = run_chat(path, stdin=io.StringIO(script), stdout=out, stderr=err, **kw)
    return turns, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 1.0, "top_k": 40},
                                {"temperature": 0.8, "top_p": 0.9}])
def test_stream_yields_exactly_generates_tokens(model, kw):
    prompt = [5, 6, 7, 8, 9]
    for seed in range(3):
        streamed = list(stream(model, prompt, 30, generator=torch.Generator().manual_seed(seed), **kw))
        rollout = generate(model, [prompt], 30, generator=torch.Generator().manual_seed(seed), **kw)
        assert streamed == rollout.responses()[0] and len(streamed) == 30


def test_stream_stops_after_the_stop_token_and_yields_it(model):
    free = list(stream(model, [1, 2, 3], 20, temperature=0))
    stop = free[6]
    first = free.index(stop)
    got = list(stream(model, [1, 2, 3], 20, temperature=0, stop_tokens=[stop]))
    assert got == free[:first + 1]
    assert got == generate(model, [[1, 2, 3]], 20, temperature=0, stop_tokens=[stop]).responses()[0]


def test_stream_refuses_a_prompt_that_leaves_no_room_at_the_call(model):
    with pytest.raises(ValueError, match="max_seq_len 64"):
        stream(model, list(range(60)), 5)  # raises before the first next()
    model.train()
    list(stream(model, [1, 2], 3))
    assert model.training  # its mode is restored once the stream ends
    model.eval()


def test_decode_stream_prints_characters_split_across_tokens(tok):
    ids = tok.encode(MULTIBYTE)
    pieces = [tok.decode_bytes([t]) for t in ids]
    split = [p for p in pieces if p.decode("utf-8", errors="replace") != p.decode("utf-8", "ignore")
             or not p.decode("utf-8", "ignore")]
    assert split, "the test needs a character whose bytes are split across tokens"
    assert "".join(tok.decode([t]) for t in ids) != MULTIBYTE  # decoding token by token breaks it
    assert "".join(decode_stream(tok, ids)) == MULTIBYTE
    assert "".join(decode_stream(tok, ids[:-1])).endswith("\ufffd")  # a cut-off character: U+FFFD


def test_one_reply_per_line_and_the_history_is_kept(ckpt, tok):
    turns, out, err = chat(ckpt, "hello there\nhow are you\n\nthe lazy dog\n", max_new_tokens=6)
    assert [t.user for t in turns] == ["hello there", "how are you", "the lazy dog"]
    assert out.count("assistant: ") == 3 and out.count("user: ") == 3
    assert all(t.reply in out for t in turns)
    history = []
    for t in turns:  # each prompt is the whole conversation so far, rendered with the template
        history.append({"role": "user", "content": t.user})
        assert t.prompt_tokens == len(render_prompt(tok, history))
        history.append({"role": "assistant", "content": t.reply})
    assert "warning" not in err


def test_reset_and_system_commands(ckpt, tok):
    script = "hello there\nhow are you\n/reset\nhow are you\n/system Be brief.\nok\n/quit\nnever read\n"
    turns, out, err = chat(ckpt, script, max_new_tokens=6)
    fresh = len(render_prompt(tok, [{"role": "user", "content": "how are you"}]))
    assert len(turns) == 4 and turns[1].prompt_tokens > fresh
    assert turns[2].prompt_tokens == fresh  # after /reset: a fresh conversation
    expected = render_prompt(tok, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "how are you"},
                                   {"role": "assistant", "content": turns[2].reply},
                                   {"role": "user", "content": "ok"}])
    assert turns[3].prompt_tokens == len(expected)
    assert "(new conversation)" in err and "never read" not in out


def test_history_is_truncated_to_fit_the_context(ckpt, tok):
    lines = [f"the quick brown fox number {i} jumps" for i in range(8)]
    turns, _, err = chat(ckpt, "\n".join(lines) + "\n", max_new_tokens=8)
    assert len(turns) == 8
    assert all(t.prompt_tokens + 8 <= 64 for t in turns)
    assert any(t.dropped for t in turns)
    assert err.count("outgrew") == 1  # said once


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(ckpt):
    turns, _, err = chat(ckpt, "fox " * 80 + "\nhello\n", max_new_tokens=8)
    assert [t.user for t in turns] == ["hello"] and "Shorten it" in err


def test_ctrl_c_during_a_reply_forgets_it_and_at_the_prompt_leaves(ckpt, tok, monkeypatch):
    def interrupted(*args, **kwargs):
        yield tok.encode("a")[0]
        raise KeyboardInterrupt
    real, calls = chat_cli.stream, []

    def first_call_interrupted(*args, **kwargs):
        calls.append(args)
        return interrupted() if len(calls) == 1 else real(*args, **kwargs)
    monkeypatch.setattr(chat_cli, "stream", first_call_interrupted)
    turns, _, err = chat(ckpt, "first\nsecond\n", max_new_tokens=4)
    fresh = len(render_prompt(tok, [{"role": "user", "content": "second"}]))
    assert [t.user for t in turns] == ["second"] and turns[0].prompt_tokens == fresh
    assert "interrupted" in err

    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt
    assert run_chat(ckpt, stdin=CtrlC(), stdout=io.StringIO(), stderr=io.StringIO()) == []


def test_same_seed_same_replies(ckpt):
    a, _, _ = chat(ckpt, "hello\nhow are you\n", max_new_tokens=8, seed=3)
    b, _, _ = chat(ckpt, "hello\nhow are you\n", max_new_tokens=8, seed=3)
    assert [t.reply for t in a] == [t.reply for t in b]


def test_not_chat_tuned_and_no_chat_tokens_warn_once_but_chat(tmp_path, model, tok):
    pre = save_checkpoint(tmp_path / "pre", model, tok, meta={"stage": "pretrain"})
    turns, _, err = chat(pre, "hello\n", max_new_tokens=4)
    assert len(turns) == 1 and err.count("warning") == 1 and "not chat-tuned" in err
    plain_tok = Tokenizer.train(TEXT, 316, special_tokens=("<|endoftext|>",), progress=False)
    plain = save_checkpoint(tmp_path / "plain", model, plain_tok, meta={"stage": "sft"})
    turns, _, err = chat(plain, "hello\nagain\n", max_new_tokens=4)
    assert len(turns) == 2 and err.count("warning") == 1 and "no chat tokens" in err
    assert turns[0].prompt_tokens == len(plain_tok.encode("User: hello\nAssistant:"))


def test_lora_adapters_are_merged(tmp_path, tok):
    from minilm.lora import apply_lora, lora_layers
    torch.manual_seed(1)
    lora_model = Phi3(tiny_config())
    apply_lora(lora_model, r=4)
    for name, p in lora_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero; make the adapters matter
    ids = torch.tensor([tok.encode("hello there")])
    expected = lora_model.eval()(ids)[0]
    merged, _, _ = load_chat_model(save_checkpoint(tmp_path / "lora", lora_model, tok, meta={"stage": "sft"}))
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(ids)[0], expected, atol=1e-5, rtol=1e-5)


def test_cli_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and "not a minilm checkpoint" in err


def test_cli_chat_reads_a_pipe(ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you\n"))
    assert main(["chat", str(ckpt), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2
