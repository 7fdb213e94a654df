"""Phi-3 chat rendering, loss mask, prompts, reply parsing and collate, on hand-built references.

A byte-level tokenizer (no merges: every character is its byte's id, the five special tokens are
256..260) makes the expected ids writable by hand.
"""

import pytest
import torch

from minilm.post.chat import collate, parse_reply, prompts_that_fit, render_chat, render_prompt
from minilm.tokenizer import Tokenizer

pytestmark = pytest.mark.lesson_06

EOT, SYS, USER, ASSIST, END = 256, 257, 258, 259, 260
NL = 10


def b(text: str) -> list[int]:
    return list(text.encode())


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.train(["no merges needed"], vocab_size=261, progress=False)
    assert [t.special_id(s) for s in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                       "<|end|>")] == [EOT, SYS, USER, ASSIST, END]
    return t


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(["What does the command ls do? list directory contents"] * 5,
                           vocab_size=280, progress=False)


CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Yo"}]


def test_render_exact_ids_and_mask(tok):
    ids, mask = render_chat(tok, CONV)
    expected = ([SYS, NL] + b("Be brief.") + [END, NL] + [USER, NL] + b("Hi?") + [END, NL]
                + [ASSIST, NL] + b("Yo") + [END, NL])
    assert ids == expected
    n_before = len(expected) - 4  # everything up to and including "<|assistant|>\n"
    assert mask == [0] * n_before + [1, 1, 1] + [0]  # "Y", "o", <|end|>, then "\n" unmasked


def test_mask_covers_only_assistant_content_and_end(tok, bpe):
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    for t in (tok, bpe):
        ids, mask = render_chat(t, conv)
        assert len(ids) == len(mask)
        learned = [i for i, m in zip(ids, mask) if m]
        assert t.decode(learned) == "first<|end|>second<|end|>"
        assert t.decode(ids) == ("<|user|>\na<|end|>\n<|assistant|>\nfirst<|end|>\n"
                                 "<|user|>\nb<|end|>\n<|assistant|>\nsecond<|end|>\n")


def test_prompt_is_the_prefix_training_saw(tok, bpe):
    for t in (tok, bpe):
        full, mask = render_chat(t, CONV)
        prompt = render_prompt(t, CONV[:-1])
        assert prompt[-2:] == [t.special_id("<|assistant|>")] + t.encode("\n")
        assert full[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    with pytest.raises(ValueError, match="assistant"):
        render_prompt(tok, CONV)


def test_special_strings_in_content_stay_text(tok):
    ids, _ = render_chat(tok, [{"role": "user", "content": "<|end|>"}])
    assert ids == [USER, NL] + b("<|end|>") + [END, NL]  # one real <|end|> only


def test_bad_messages_are_rejected(tok):
    with pytest.raises(ValueError, match="role"):
        render_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        render_chat(tok, [])


def test_parse_reply(tok):
    assert parse_reply(tok, b(" list dir ") + [END, NL] + b("junk")) == ("list dir", True)
    assert parse_reply(tok, b("no end in sight")) == ("no end in sight", False)
    assert parse_reply(tok, b("runs on") + [USER] + b("more") + [END]) == ("runs on", False)
    assert parse_reply(tok, torch.tensor([END])) == ("", True)


def test_collate_shifts_targets_and_pads_right():
    a = ([5, 6, 7, 8], [0, 0, 1, 1])
    c = ([9, 10], [0, 1])
    batch = collate([a, c], pad_id=0, max_len=16)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    # targets[t] = ids[t+1] where loss_mask[t+1] == 1
    assert batch["targets"].tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_collate_truncates_and_checks():
    batch = collate([([1, 2, 3, 4, 5], [1, 1, 1, 1, 1])], pad_id=0, max_len=3)
    assert batch["tokens"].tolist() == [[1, 2, 3]] and batch["targets"].tolist() == [[2, 3, -100]]
    with pytest.raises(ValueError, match="mask"):
        collate([([1, 2], [1])], pad_id=0, max_len=8)


def test_collated_loss_counts_only_assistant_tokens(tok):
    """The model's loss on a collated batch equals cross-entropy over the masked targets alone."""
    from conftest import tiny_config

    from minilm.model import Phi3
    model = Phi3(tiny_config(vocab_size=261))
    ids, mask = render_chat(tok, CONV)
    batch = collate([(ids, mask), render_chat(tok, CONV[1:])], pad_id=EOT, max_len=64)
    logits, loss = model(batch["tokens"], batch["targets"], attention_mask=batch["attention_mask"])
    keep = batch["targets"] != -100
    assert keep.sum() == 2 * 3  # "Yo<|end|>" predicted in each row
    manual = torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep])
    torch.testing.assert_close(loss, manual)


def test_only_prompts_with_room_for_the_reply_are_kept(tok):
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
             for q in ("hi", "a much longer question that takes many more tokens to say")]
    sizes = [len(render_prompt(tok, c["messages"][:-1])) for c in convs]
    assert prompts_that_fit(tok, convs, sizes[1]) == convs
    assert prompts_that_fit(tok, convs, sizes[1] - 1) == convs[:1]
    assert prompts_that_fit(tok, convs, sizes[0] - 1) == []
