"""The passkey prompt: exact length, the needle at its depth, answers scored by the first number."""
from __future__ import annotations

import pytest
import torch

from lowbit.eval.passkey import HEADER, NEEDLE, QUESTION, PasskeyTrial, accuracy_by_depth, passkey_prompt
from lowbit.models.load import load


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load(str(tiny_llama_dir)).tokenizer


@pytest.mark.parametrize("depth", [0.0, 0.25, 1.0])
def test_prompt_length_and_needle_depth(tokenizer, depth):
    filler = torch.arange(1000) % 200 + 3
    ids = passkey_prompt(tokenizer, filler, 400, depth, "12345", offset=17)[0]
    assert ids.numel() == 400
    enc = lambda s, special=False: tokenizer(s, add_special_tokens=special, return_tensors="pt").input_ids[0]
    header, needle, question = enc(HEADER, True), enc(NEEDLE.format(key="12345")), enc(QUESTION)
    room = 400 - header.numel() - needle.numel() - question.numel()
    at = header.numel() + round(depth * room)                         # where the needle must start
    assert torch.equal(ids[:header.numel()], header)
    assert torch.equal(ids[at:at + needle.numel()], needle)
    assert torch.equal(ids[-question.numel():], question)
    filler_part = torch.cat([ids[header.numel():at], ids[at + needle.numel():-question.numel()]])
    assert torch.equal(filler_part, filler[17:17 + room])              # consecutive filler from the offset


def test_prompt_refuses_bad_requests(tokenizer):
    filler = torch.arange(100) + 3
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, filler, 80, 1.5, "1", 0)
    with pytest.raises(ValueError, match="filler text has"):
        passkey_prompt(tokenizer, filler, 400, 0.5, "1", 0)


def test_scoring():
    trials = [PasskeyTrial(1024, 0.5, "12345", " 12345. Remember"), PasskeyTrial(1024, 0.5, "12345", " the key"),
              PasskeyTrial(1024, 1.0, "12345", " 123456")]
    assert [t.correct for t in trials] == [True, False, False]
    assert accuracy_by_depth(trials) == {0.5: 0.5, 1.0: 0.0}
