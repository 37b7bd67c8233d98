"""Which model the playground serves (cache, export once, offline fallback) and the pure
helpers of the page (history flattening, escaping, summary), without a server."""

from __future__ import annotations

import json
import os

import pytest

from playground import models
from playground.service import (ChatSettings, Playground, drop_last_exchange, flatten_content,
                                history_to_messages, shown, stats_markdown, summary_line)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BITNET_DEMO_MODEL", "none")  # the stand-in, whatever ships in models/
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    return tmp_path / "cache"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("BITNET_ONNX_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert models.model_cache_dir() == tmp_path / "hf" / "bitnet-onnx"
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "c"))
    assert models.model_cache_dir() == tmp_path / "c"


def test_offline_without_cache_falls_back_to_a_labelled_stand_in(cache, capsys):
    lines = []
    r = models.resolve_model(models.DEFAULT_MODEL, progress=lines.append, check_hub=lambda: False)
    assert r.fallback and r.untrained and r.requested == models.DEFAULT_MODEL
    assert models.is_exported(r.folder) and r.folder.startswith(str(cache))
    # one plain line says what happened
    notice = [line for line in lines if "Cannot reach the Hugging Face hub" in line]
    assert len(notice) == 1 and "\n" not in notice[0] and models.DEFAULT_MODEL in notice[0]
    with open(os.path.join(r.folder, "bitnet_onnx.json")) as f:
        cfg = json.load(f)
    assert set(cfg["variants"]) == {"ternary", "int2", "int4", "fp32"}
    # the banner names the live model and says it is an untrained stand-in
    pg = Playground(models.DEFAULT_MODEL, threads=1,
                    resolver=lambda spec, variants, progress: r)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    banner = pg.banner_markdown()
    assert "tiny random" in banner and "untrained stand-in" in banner
    assert "Cannot reach the Hugging Face hub" in banner
    assert list(pg.api_models()) == [models.STAND_IN_NAME]  # an id for the API, not the banner text
    # a second start reuses the stand-in (no new export)
    mtime = os.path.getmtime(os.path.join(r.folder, "bitnet_onnx.json"))
    again = models.resolve_model(models.DEFAULT_MODEL, progress=lines.append, check_hub=lambda: False)
    assert again.folder == r.folder
    assert os.path.getmtime(os.path.join(r.folder, "bitnet_onnx.json")) == mtime


def test_cached_export_is_reused_and_checkpoint_folders_are_exported_once(cache, tmp_path):
    ckpt = models.write_stand_in_checkpoint(tmp_path / "ckpt", seed=1)
    lines = []
    first = models.resolve_model(str(ckpt), progress=lines.append, check_hub=lambda: pytest.fail("no hub"))
    assert not first.fallback and models.is_exported(first.folder)
    assert any("exporting" in line for line in lines)
    lines.clear()
    second = models.resolve_model(str(ckpt), progress=lines.append)
    assert second.folder == first.folder
    assert not any("exporting" in line for line in lines)
    # an exported folder is served as it is
    direct = models.resolve_model(first.folder, progress=lines.append)
    assert direct.folder == os.path.abspath(first.folder) and not direct.fallback
    # a hub id whose export is cached needs no hub
    hub_out = cache / "someorg--somemodel"
    os.rename(first.folder, hub_out)
    cached = models.resolve_model("someorg/somemodel", progress=lines.append,
                                  check_hub=lambda: pytest.fail("no hub"))
    assert cached.folder == str(hub_out) and not cached.fallback
    assert cached.model_id == "someorg/somemodel"


def test_bad_model_argument_is_one_clear_error(cache, tmp_path):
    with pytest.raises(SystemExit, match="not a hub id"):
        models.resolve_model("no-such-thing", progress=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither an exported model folder"):
        models.resolve_model(str(tmp_path / "empty"), progress=lambda m: None)


def test_failed_preparation_is_shown_not_raised(cache):
    def broken(spec, variants, progress):
        raise RuntimeError("disk full")

    pg = Playground("x/y", resolver=broken)
    pg.start(background=False)
    assert pg.state == "failed" and "disk full" in pg.banner_markdown()
    assert pg.status()["state"] == "failed"


def test_preparing_banner_shows_progress():
    pg = Playground("org/model")
    pg.state = "preparing"
    pg.progress("layer 3/30 done (12 s)")
    text = pg.banner_markdown()
    assert "Preparing" in text and "layer 3/30" in text and "org/model" in text


def test_history_flattening_and_escaping():
    raw = 'Hi <script>alert("x")</script> & <b>bold</b>'
    assert shown(raw) == 'Hi &lt;script&gt;alert("x")&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;'
    history = [
        {"role": "user", "content": [{"type": "text", "text": shown(raw)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "part 1 "}, {"type": "text", "text": "part 2"}]},
        {"role": "assistant", "content": "note", "metadata": {"title": "a note"}},
        {"role": "user", "content": "plain string"},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": raw}, {"role": "assistant", "content": "part 1 part 2"},
        {"role": "user", "content": "plain string"}]
    rest, last = drop_last_exchange(history)
    assert last == "plain string" and len(rest) == 3
    assert flatten_content(None) == "" and flatten_content({"text": "t"}) == "t"


def test_summary_and_stats_lines():
    t = {"decode_tokens_per_s": 40.0, "prefill_tokens_per_s": 200.0, "ttft_s": 0.25,
         "new_tokens": 10, "prompt_tokens": 5, "rss_mb": 1500.0}
    b = dict(t, decode_tokens_per_s=20.0, prefill_tokens_per_s=100.0, ttft_s=0.5)
    line = summary_line(t, b, "int2", {"ternary": 500.0, "int2": 1000.0})
    assert "2.00x" in line and "memory: 0.50x" in line and "\n" not in line
    md = stats_markdown("ternary", t, "done", 500.0)
    assert "TTFT **250 ms**" in md and "decode **40.0 tok/s**" in md and "**5** in + **10** out" in md
    assert "no baseline" in summary_line(t, None, "none", {})


def test_settings_map_to_the_runtime():
    s = ChatSettings(max_new_tokens=0, temperature=-1, top_p=0, top_k=-3, seed=-1).to_runtime()
    s.validate()
    assert s.max_new_tokens == 1 and s.temperature == 0 and s.top_k == 0 and s.seed is None
    assert s.truncate  # long histories drop their oldest turns
    assert ChatSettings(seed=5).to_runtime().seed == 5


def test_compare_runs_one_engine_after_the_other_with_a_time_limit(tmp_path, monkeypatch):
    """In-process: the ternary engine answers, then the baseline; a run longer than the time
    limit is cut between tokens (the baseline still runs), and the page says so."""
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    ckpt = models.write_stand_in_checkpoint(tmp_path / "ckpt", seed=2, context=8192,
                                            end_of_turn_scale=0.0)
    resolved = models.resolve_model(str(ckpt), progress=lambda m: None)
    pg = Playground(str(ckpt), threads=1, resolver=lambda spec, variants, progress: resolved,
                    time_limit_s=0.3)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    overlaps = 0
    for final in pg.compare("Tell me everything", [], [], "", "int2",
                            ChatSettings(max_new_tokens=8000, temperature=0.8, seed=1)):
        # (the state dicts are live: check each as it comes) never both engines at once
        t, b = final["results"]["ternary"], final["results"]["int2"]
        overlaps += bool(t and t.get("finish_reason") is None and b)
    assert overlaps == 0
    assert final["final"]
    for variant in ("ternary", "int2"):
        r = final["results"][variant]
        assert r["finish_reason"] == "cancelled" and r["time_limit"]
        assert 0 < r["stats"]["new_tokens"] < 8000
    assert "time limit" in final["summary"] and "time limit" in final["stats_t"]
    assert pg.status()["active_generations"] == 0


def test_demo_model_is_the_offline_fallback_when_it_ships(cache, tmp_path, monkeypatch):
    demo = models.write_stand_in_checkpoint(tmp_path / "demo-ckpt", seed=5)  # any checkpoint
    monkeypatch.setenv("BITNET_DEMO_MODEL", str(demo))
    lines = []
    r = models.resolve_model(models.DEFAULT_MODEL, progress=lines.append, check_hub=lambda: False)
    assert r.fallback and not r.untrained and "Shakespeare demo model" in r.name
    assert models.is_exported(r.folder)
    assert models.resolve_model("demo", progress=lines.append).folder == r.folder
    assert not models.resolve_model("demo", progress=lines.append).fallback
    # a broken demo folder falls back to the stand-in, with one line saying why
    (demo / "config.json").write_text("{not json")
    os.utime(demo / "config.json", (2e9, 2e9))  # newer than the cached export
    lines.clear()
    broken = models.resolve_model("demo", progress=lines.append)
    assert broken.untrained and any("cannot be used" in line for line in lines)


def test_download_progress_reaches_the_log(tmp_path):
    lines = []
    watcher = models._DownloadWatcher("org/name", lines.append, every_s=0.05)
    watcher.folder = tmp_path
    (tmp_path / "blob.incomplete").write_bytes(b"0" * (3 * 2**20))
    import time

    time.sleep(0.4)
    watcher.stop()
    assert any(line.startswith("downloading: ") for line in lines)


def test_hub_probe_is_off_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False


def test_default_threads_respect_the_cpu_quota():
    from playground.service import available_cpus

    n = available_cpus()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert Playground("x/y").threads == n and Playground("x/y", threads=3).threads == 3


def test_failed_download_falls_back_with_the_reason(cache, monkeypatch):
    from export import ExportError

    def failing_export(source, out, variants, progress):
        raise ExportError("could not download org/missing from the hub: 404 Not Found")

    monkeypatch.setattr(models, "_export", failing_export)
    monkeypatch.setattr(models, "demo_model", lambda progress, requested: models.ResolvedModel(
        "/nowhere", models.STAND_IN_LABEL, requested, fallback=True, untrained=True))
    lines = []
    r = models.resolve_model("org/missing", progress=lines.append, check_hub=lambda: True)
    assert r.fallback and "Could not download and export org/missing" in r.notice
    assert "404 Not Found" in r.notice and sum("Could not download" in line for line in lines) == 1


def test_page_waits_for_the_shared_cpu_gate_and_stop_gives_up_the_place(tmp_path, monkeypatch):
    import server  # the project's own package: a broken import fails, never skips
    import threading

    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    ckpt = models.write_stand_in_checkpoint(tmp_path / "ckpt", seed=2, end_of_turn_scale=0.0)
    resolved = models.resolve_model(str(ckpt), progress=lambda m: None)
    pg = Playground(str(ckpt), threads=1, resolver=lambda spec, variants, progress: resolved)
    pg.start(background=False)
    pg.gate = server.Gate(concurrency=1, queue_size=4)
    release = threading.Event()
    held = threading.Event()

    def api_generation():  # an API request holding the CPU
        with pg.gate.slot(timeout=5):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=api_generation)
    holder.start()
    assert held.wait(5)
    threading.Timer(0.5, pg.stop, args=["s1"]).start()
    labels = []
    started = __import__("time").time()
    for state in pg.compare("Hi", [], [], "", "int2", ChatSettings(max_new_tokens=8), session="s1"):
        labels.append(state["stats_t"])
    assert __import__("time").time() - started < 5  # Stop did not wait for the gate
    release.set()
    holder.join(5)
    assert any("waiting for the CPU" in label for label in labels)
    assert state["results"]["ternary"]["finish_reason"] == "cancelled"
    assert state["results"]["int2"]["finish_reason"] == "cancelled"
    assert "stopped before it started" in state["chat_t"][-1]["content"]
    assert pg.gate.idle()
    # with the gate free, the page runs as usual
    final = list(pg.compare("Hi", [], [], "", "int2", ChatSettings(max_new_tokens=4), session="s2"))[-1]
    assert final["results"]["int2"]["stats"]["new_tokens"] == 4
