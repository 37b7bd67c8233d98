"""The shipped tokenizer of the demo model (models/shakespeare-bitnet)."""

import json
import os

import pytest

from demo import corpus, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "shakespeare-bitnet")


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load(MODEL)


def test_special_tokens(tok):
    with open(os.path.join(MODEL, "config.json")) as f:
        config = json.load(f)
    assert tok.get_vocab_size() == config["vocab_size"] == tokenizer.VOCAB_SIZE
    ids = {t: tok.token_to_id(t) for t in corpus.SPECIAL_TOKENS}
    assert ids == {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2}
    assert config["bos_token_id"] == 0 and config["eos_token_id"] == 1
    for text, i in ids.items():   # each special token is one token, never split
        assert tok.encode(f"a{text}b", add_special_tokens=False).ids[1] == i


@pytest.mark.parametrize("text", [
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  odd  spacing\tand tabs\n\n",
    "Unicode: café — naïve “quotes” 🎭 日本",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_chat_round_trip_and_bos(tok):
    chat = corpus.render([{"role": "user", "content": "Good morrow."},
                          {"role": "assistant", "content": "Good morrow, sweet lady."}])
    ids = tok.encode(chat, add_special_tokens=False).ids
    assert ids[0] == 0 and ids.count(2) == 2
    assert tok.decode(ids, skip_special_tokens=False) == chat
    assert tok.encode("Hark", add_special_tokens=True).ids[0] == 0   # BOS like Llama 3's


def test_tokenizer_config_and_chat_template():
    with open(os.path.join(MODEL, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|end_of_text|>"
    assert cfg["chat_template"] == tokenizer.CHAT_TEMPLATE
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(MODEL)
    msgs = [{"role": "user", "content": "Who's there?"},
            {"role": "assistant", "content": "Nay, answer me."},
            {"role": "user", "content": " Long live the king! "}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == corpus.render(msgs, add_generation_prompt=True)


def test_generation_prompt_is_a_token_prefix_of_the_trained_turn(tok):
    """The prompt ends in 'Assistant: '; its trailing space must tokenize as in training turns."""
    history = [{"role": "user", "content": "Who goes there?"}]
    prompt = tok.encode(corpus.render(history, add_generation_prompt=True), add_special_tokens=False).ids
    for reply in ("Nay, answer me.", "A friend to this ground.", "'Tis I."):
        full = corpus.render(history + [{"role": "assistant", "content": reply}])
        ids = tok.encode(full, add_special_tokens=False).ids
        assert ids[: len(prompt)] == prompt, reply
