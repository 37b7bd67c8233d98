"""Byte-level BPE tokenizer for the demo model, trained with `tokenizers` on the training plays.

Special tokens (ids 0, 1, 2) use Llama 3's names so the chat template and stop logic of
microsoft/bitnet-b1.58-2B-4T apply unchanged. Like Llama 3's tokenizer, encoding with
special tokens prepends <|begin_of_text|>; the chat template writes it itself (encode a
rendered chat with add_special_tokens=False, as transformers' apply_chat_template does).
"""

from __future__ import annotations

import json
import os

from . import corpus

VOCAB_SIZE = 4096

# How text is cut into words before BPE: one regex with no look-around (onnxruntime-genai's
# tokenizer rejects look-around; with this pattern it gives the same ids as `tokenizers`, checked
# on every conversation of the corpus) and ASCII classes only (the two regex engines disagree on
# Unicode classes; anything non-ASCII is a symbol here, and byte-level BPE still covers it).
# - ": " is a word of its own, so "Assistant: Nay" in training is cut as the generation prompt
#   "Assistant: " plus "Nay": the prompt ends on the same token the model saw in training
#   (plain byte-level BPE would glue the space to the next word);
# - an apostrophe keeps the letters after it ("'tis", "o'er", "we'll"), a word keeps one leading
#   space, other runs of symbols stay together, runs of whitespace stay apart.
PRETOKENIZE_PATTERN = r" ?'[A-Za-z]+|: | ?[A-Za-z]+| ?[0-9]+| ?[^ \t\r\nA-Za-z0-9]+|[ \t\r\n]+"

# microsoft/bitnet-b1.58-2B-4T's chat template (tokenizer_config.json), with one spelling
# changed so that onnxruntime-genai's template engine (minja, which has no `capitalize`
# filter) renders it too: `message['role'].capitalize()` for `message['role'] | capitalize`.
# Both render the same text in jinja2 (transformers, our runtime) and in genai.
CHAT_TEMPLATE_2B4T = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'].capitalize() + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def train_tokenizer(plays, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(corpus.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.tokenizer_texts(plays), trainer=trainer)
    bos_id = tok.token_to_id(corpus.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{corpus.BOS} $A", pair=f"{corpus.BOS} $A {corpus.BOS} $B",
        special_tokens=[(corpus.BOS, bos_id)])
    return tok


def tokenizer_config(tok) -> dict:
    """tokenizer_config.json in the shape of 2B4T's (PreTrainedTokenizerFast)."""
    added = {}
    for text in corpus.SPECIAL_TOKENS:
        added[str(tok.token_to_id(text))] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    return {
        "added_tokens_decoder": added,
        "bos_token": corpus.BOS,
        "eos_token": corpus.EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save(tok, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(tok), f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": corpus.BOS, "eos_token": corpus.EOS}, f, indent=2)
        f.write("\n")


def load(folder: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
