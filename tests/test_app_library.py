"""The conversations a visitor keeps in their browser, export and import, and the cost per
token, without a server (the browser side: tests/test_app_browser.py)."""

from __future__ import annotations

import json

import pytest

from playground import library as lib
from playground.conversation import new_turn
from playground.export import ImportFailed, from_json, to_json, to_markdown
from playground.turns import with_cost


def turn(user, text="an answer", baseline="int2"):
    t = new_turn(user, baseline, 7, 512, {"temperature": 0.6, "system": "Be brief."})
    for variant, answer in t["answers"].items():
        answer.update(text=f"{variant}: {text}", state="done", finish_reason="stop",
                      stats={"new_tokens": 5, "prompt_tokens": 9, "ttft_s": 0.01,
                             "decode_tokens_per_s": 100.0, "cpu_ms_per_token": 2.5})
    return t


def test_new_switch_rename_delete():
    library = lib.empty()
    assert len(library["items"]) == 1 and lib.current(library)["turns"] == []
    library = lib.with_turns(library, [turn("first question here")])
    first = library["current"]
    assert lib.current(library)["title"] == "first question here"
    library = lib.with_new(library)
    second = library["current"]
    assert second != first and lib.current(library)["turns"] == []
    library = lib.with_turns(library, [turn("second")])
    assert [label for label, _ in lib.choices(library)] == ["second", "first question here"]
    library = lib.renamed(library, "  My   chat ")
    assert lib.current(library)["title"] == "My chat"
    library = lib.with_turns(library, [turn("second"), turn("more")])
    assert lib.current(library)["title"] == "My chat"  # a name the visitor gave stays
    library = lib.switched(library, first)
    assert lib.current(library)["turns"][0]["user"] == "first question here"
    assert lib.switched(library, "no-such-id") == library
    library = lib.deleted(library)
    assert library["current"] == second and len(library["items"]) == 1
    library = lib.deleted(library)
    assert len(library["items"]) == 1 and lib.current(library)["turns"] == []  # never empty


def test_stored_values_are_read_safely():
    assert lib.current(lib.library_of(None))["turns"] == []
    assert lib.current(lib.library_of({"items": "junk"}))["turns"] == []
    # what an older page kept: one conversation, a list of turns (or its JSON text)
    old = lib.library_of(json.dumps([turn("kept")]))
    assert lib.current(old)["turns"][0]["user"] == "kept"
    mixed = lib.library_of({"current": "gone", "items": [
        {"id": "a", "title": "A", "updated": 1, "turns": [turn("a")]},
        {"id": "b", "title": "B", "updated": 2, "turns": "not turns"}, "junk"]})
    assert mixed["current"] == "b" and lib.current(mixed)["turns"] == []


def test_labels_are_unique_and_the_library_bounded():
    library = lib.empty()
    for _ in range(lib.MAX_CONVERSATIONS + 5):
        library = lib.with_turns(lib.with_new(library), [turn("same")])
    assert len(library["items"]) == lib.MAX_CONVERSATIONS
    labels = [label for label, _ in lib.choices(library)]
    assert len(set(labels)) == len(labels)


def test_json_export_round_trips_and_markdown_reads_well():
    turns = [turn("Is `a<b && c>d`?", text="```c\nif (a < b && c > d) {}\n```")]
    doc = json.loads(to_json(turns, "Code", "demo"))
    assert doc["format"] == "bitnet-onnx-conversation" and doc["title"] == "Code"
    assert doc["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Is `a<b && c>d`?"},
                               {"role": "assistant", "content": "ternary: ```c\nif (a < b && c > d) {}\n```"}]
    assert doc["turns"][0]["settings"]["temperature"] == 0.6
    assert doc["turns"][0]["answers"]["int2"]["stats"]["cpu_ms_per_token"] == 2.5
    assert from_json(to_json(turns, "Code", "demo")) == ("Code", turns)
    md = to_markdown(turns, "Code", "demo")
    assert md.startswith("# Code\n") and "if (a < b && c > d) {}" in md and "&lt;" not in md
    assert "**int2 (stock ORT MatMulNBits 2-bit):**" in md and "CPU 2.50 ms/token" in md


@pytest.mark.parametrize("data, why", [
    (b"not json", "not JSON"),
    (b'{"format": "other"}', "not a conversation exported"),
    (b'{"format": "bitnet-onnx-conversation", "version": 9, "turns": []}', "version 9"),
    (b'{"format": "bitnet-onnx-conversation", "version": 1, "turns": [{"x": 1}]}', "no turns"),
])
def test_import_refuses_other_files_with_the_reason(data, why):
    with pytest.raises(ImportFailed, match=why):
        from_json(data)


def test_cost_per_token_is_shared_by_the_batch():
    alone = with_cost({"new_tokens": 10}, cpu_s=0.5, weights_mb=400.0)
    assert alone["cpu_s"] == 0.5 and alone["cpu_ms_per_token"] == pytest.approx(50.0)
    assert alone["weights_mb_per_token"] == 400.0
    shared = with_cost({"new_tokens": 10, "batch_size": 2.0}, cpu_s=0.5, weights_mb=400.0)
    assert shared["cpu_ms_per_token"] == pytest.approx(25.0) and shared["weights_mb_per_token"] == 200.0
    assert with_cost({"new_tokens": 0}, cpu_s=0.1, weights_mb=400.0)["cpu_ms_per_token"] is None


def test_a_link_carries_the_conversation_and_settings():
    from playground.links import MAX_PAYLOAD_CHARS, TIMELINE_POINTS, decode, encode
    from playground.settings import PageSettings

    turns = [turn("Is `a<b`?"), turn("more <b>&</b>", baseline="none")]
    turns[0]["answers"]["ternary"]["timeline"] = [[i / 100, i] for i in range(480)]
    payload, kept = encode(turns, PageSettings(seed=42, top_k=7, baseline="int4"))
    assert kept == 2 and set(payload) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    back, settings = decode("#c=" + payload)
    assert settings == PageSettings(seed=42, top_k=7, baseline="int4")
    assert [t["user"] for t in back] == ["Is `a<b`?", "more <b>&</b>"]
    timeline = back[0]["answers"]["ternary"]["timeline"]
    assert len(timeline) == TIMELINE_POINTS and timeline[-1] == [4.79, 479]  # thinned, end kept
    # a conversation too long for a link keeps its newest turns
    rng = __import__("random").Random(1)
    long_turns = [turn(f"q{i}", text=rng.randbytes(3000).hex()) for i in range(30)]  # 4 kB a turn
    payload, kept = encode(long_turns, PageSettings())
    assert len(payload) <= MAX_PAYLOAD_CHARS and 0 < kept < 30
    assert decode(payload)[0][-1]["user"] == long_turns[-1]["user"]


@pytest.mark.parametrize("fragment", ["#c=", "#c=@@@", "#c=eJzLSM3JyQcABiwCFQ", "#c=" + "A" * 40])
def test_a_damaged_link_is_one_clear_error(fragment):
    from playground.links import BadLink, decode

    with pytest.raises(BadLink):
        decode(fragment)


def test_settings_from_a_link_are_checked():
    from playground.settings import PageSettings

    s = PageSettings.from_values({"seed": "x", "top_k": 3.0, "max_new_tokens": "40", "system": None,
                                  "unknown": 1})
    assert s == PageSettings(seed=-1, top_k=3, max_new_tokens=40)


def test_browser_storage_key_survives_restarts(monkeypatch):
    from playground.storage import browser_secret

    monkeypatch.delenv("BITNET_BROWSER_SECRET", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    key, where = browser_secret()
    assert key == browser_secret()[0] and "BITNET_BROWSER_SECRET" in where  # the same every start
    monkeypatch.setenv("SPACE_ID", "org/space")
    assert browser_secret()[0] != key and "org/space" in browser_secret()[1]
    monkeypatch.setenv("BITNET_BROWSER_SECRET", "chosen")
    assert browser_secret()[0] == "chosen"
