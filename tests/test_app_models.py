"""Which model the playground serves (cache, export once, offline fallback to the demo model)
and the playground service in-process (gate, stop, time limit), without a server."""

from __future__ import annotations

import json
import os

import pytest

import server
from playground import models
from playground.service import ChatSettings, Playground
from tests.stand_in import write_stand_in_checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache and hub cache, offline, and a small demo checkpoint (a random
    stand-in, quicker to export than the shipped one) as the demo model."""
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    demo = write_stand_in_checkpoint(tmp_path / "shakespeare-bitnet", seed=5)
    monkeypatch.setenv("BITNET_DEMO_MODEL", str(demo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    return tmp_path / "cache"


def no_hub(spec):
    pytest.fail("the hub was asked")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("BITNET_ONNX_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert models.model_cache_dir() == tmp_path / "hf" / "bitnet-onnx"
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "c"))
    assert models.model_cache_dir() == tmp_path / "c"


def test_offline_without_cache_falls_back_to_the_labelled_demo_model(cache):
    lines = []
    # the real fetch: snapshot_download with HF_HUB_OFFLINE=1 and an empty hub cache
    r = models.resolve_model(models.DEFAULT_MODEL, progress=lines.append)
    assert r.fallback and r.requested == models.DEFAULT_MODEL and "Shakespeare demo model" in r.name
    assert models.is_exported(r.folder) and r.folder.startswith(str(cache))
    # one plain line says what happened
    notice = [line for line in lines if "Cannot reach the Hugging Face hub" in line]
    assert len(notice) == 1 and "\n" not in notice[0] and models.DEFAULT_MODEL in notice[0]
    with open(os.path.join(r.folder, "bitnet_onnx.json")) as f:
        cfg = json.load(f)
    assert set(cfg["variants"]) == {"ternary", "int2", "int4", "fp32"}
    pg = Playground(models.DEFAULT_MODEL, threads=1, resolver=lambda spec, variants, progress: r)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    banner = pg.banner_markdown()
    assert "Shakespeare demo model" in banner and "Cannot reach the Hugging Face hub" in banner
    assert "BitLinear kernel" in banner  # the hardware line
    assert list(pg.api_models()) == ["shakespeare-bitnet"]  # readable: the checkpoint's folder name
    # a second start reuses the export (no new export)
    mtime = os.path.getmtime(os.path.join(r.folder, "bitnet_onnx.json"))
    again = models.resolve_model(models.DEFAULT_MODEL, progress=lines.append)
    assert again.folder == r.folder
    assert os.path.getmtime(os.path.join(r.folder, "bitnet_onnx.json")) == mtime


def test_no_demo_model_is_one_clear_error(cache, monkeypatch):
    monkeypatch.setenv("BITNET_DEMO_MODEL", "none")
    with pytest.raises(RuntimeError, match="no model to serve: the demo model is unavailable"):
        models.resolve_model(models.DEFAULT_MODEL, progress=lambda m: None)


def test_the_hub_copy_is_exported_once(cache, tmp_path):
    """snapshot_download's folder (download or hub cache) is exported; the config names the hub id."""
    ckpt = write_stand_in_checkpoint(tmp_path / "hub-copy", seed=4)
    asked = []
    r = models.resolve_model("org/model", progress=lambda m: None,
                             fetch=lambda spec: asked.append(spec) or str(ckpt))
    assert asked == ["org/model"] and not r.fallback and r.model_id == "org/model"
    assert models.read_config(r.folder)["source"] == "org/model"
    again = models.resolve_model("org/model", progress=lambda m: None, fetch=no_hub)
    assert again.folder == r.folder


def test_cached_export_is_reused_and_checkpoint_folders_are_exported_once(cache, tmp_path):
    ckpt = write_stand_in_checkpoint(tmp_path / "ckpt", seed=1)
    lines = []
    first = models.resolve_model(str(ckpt), progress=lines.append, fetch=no_hub)
    assert first.model_id == "ckpt"  # the checkpoint's folder name, not the cache copy's
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
    cached = models.resolve_model("someorg/somemodel", progress=lines.append, fetch=no_hub)
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


def test_settings_map_to_the_runtime():
    s = ChatSettings(max_new_tokens=0, temperature=-1, top_p=0, top_k=-3, seed=7).to_runtime(7, 30.0)
    s.validate()
    assert s.max_new_tokens == 1 and s.temperature == 0 and s.top_k == 0 and s.seed == 7
    assert s.truncate  # long histories drop their oldest turns
    assert s.max_time_s == 30.0  # the one time limit is the engine's
    # seed -1 (the default): a fresh seed per turn; a set seed is kept
    assert len({ChatSettings().turn_seed() for _ in range(8)}) > 1
    assert ChatSettings(seed=5).turn_seed() == 5


def test_compare_runs_one_engine_after_the_other_with_a_time_limit(tmp_path, monkeypatch):
    """In-process: the ternary engine answers, then the baseline; a run longer than the time
    limit is cut between tokens (the baseline still runs), and the page says so."""
    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    ckpt = write_stand_in_checkpoint(tmp_path / "ckpt", seed=2, context=8192, end_of_turn_scale=0.0)
    resolved = models.resolve_model(str(ckpt), progress=lambda m: None)
    pg = Playground(str(ckpt), threads=1, resolver=lambda spec, variants, progress: resolved,
                    time_limit_s=0.3)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    from playground.formatting import stats_markdown, summary_line

    overlaps = 0
    for turns, final in pg.compare("Tell me everything", [], "", "int2",
                                   ChatSettings(max_new_tokens=8000, temperature=0.8, seed=1)):
        # (the turn is live: check each state as it comes) never both engines at once
        t, b = turns[-1]["answers"]["ternary"], turns[-1]["answers"]["int2"]
        overlaps += bool(t["state"] in ("prefill", "streaming") and b["state"] != "waiting")
    assert overlaps == 0
    assert final
    turn = turns[-1]
    for variant in ("ternary", "int2"):
        a = turn["answers"][variant]
        assert a["finish_reason"] == "time" and a["state"] == "done"
        assert 0 < a["stats"]["new_tokens"] < 8000
    assert "time limit" in summary_line(turn, pg.time_limit_s)
    assert "time limit" in stats_markdown("ternary", turn["answers"]["ternary"], 8192, pg.time_limit_s)
    assert pg.status()["active_generations"] == 0


def test_demo_model_served_as_demo_and_a_broken_one_said_in_one_line(cache, tmp_path, monkeypatch):
    lines = []
    r = models.resolve_model("demo", progress=lines.append)
    assert not r.fallback and "Shakespeare demo model" in r.name and models.is_exported(r.folder)
    demo = tmp_path / "shakespeare-bitnet"
    (demo / "config.json").write_text("{not json")
    os.utime(demo / "config.json", (2e9, 2e9))  # newer than the cached export
    lines.clear()
    with pytest.raises(RuntimeError, match="demo model is unavailable"):
        models.resolve_model("demo", progress=lines.append)
    assert sum("cannot be used" in line for line in lines) == 1


def test_download_progress_reaches_the_log(tmp_path):
    lines = []
    watcher = models._DownloadWatcher("org/name", lines.append, every_s=0.05)
    watcher.folder = tmp_path
    (tmp_path / "blob.incomplete").write_bytes(b"0" * (3 * 2**20))
    import time

    time.sleep(0.4)
    watcher.stop()
    assert any(line.startswith("downloading: ") for line in lines)


def test_default_threads_respect_the_cpu_quota():
    from runtime.cpus import available_threads

    n = available_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert Playground("x/y").threads == n and Playground("x/y", threads=3).threads == 3


def test_failed_download_falls_back_with_the_reason(cache):
    def failing(spec):
        raise models.HubUnavailable(f"Could not download {spec} (404 Not Found)")

    lines = []
    r = models.resolve_model("org/missing", progress=lines.append, fetch=failing)
    assert r.fallback and "Could not download org/missing" in r.notice
    assert "404 Not Found" in r.notice and sum("Could not download" in line for line in lines) == 1


def test_page_waits_for_the_shared_cpu_gate_and_stop_gives_up_the_place(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("BITNET_ONNX_CACHE", str(tmp_path / "cache"))
    ckpt = write_stand_in_checkpoint(tmp_path / "ckpt", seed=2, end_of_turn_scale=0.0)
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
    from playground.conversation import model_messages, pane_messages

    states = []
    started = __import__("time").time()
    for turns, _ in pg.compare("Hi", [], "", "int2", ChatSettings(max_new_tokens=8), session="s1"):
        states.append(turns[-1]["answers"]["ternary"]["state"])
    assert __import__("time").time() - started < 5  # Stop did not wait for the gate
    release.set()
    holder.join(5)
    assert "gate" in states  # the page showed "waiting for the CPU"
    turn = turns[-1]
    assert turn["answers"]["ternary"]["finish_reason"] == "cancelled"
    assert turn["answers"]["int2"]["finish_reason"] == "cancelled"
    assert "stopped before it started" in pane_messages(turns, "ternary")[-1]["content"]
    assert "stopped before it started" in pane_messages(turns, "baseline")[-1]["content"]
    assert model_messages(turns) == []  # the note never reaches a model
    assert pg.gate.idle()
    # with the gate free, the page runs as usual, continuing that conversation
    turns, _ = list(pg.compare("Hi", turns, "", "int2", ChatSettings(max_new_tokens=4), session="s2"))[-1]
    assert turns[-1]["answers"]["int2"]["stats"]["new_tokens"] == 4
    one_message = len(pg.engines["ternary"].prompt_ids(messages=[{"role": "user", "content": "Hi"}]))
    assert turns[-1]["answers"]["ternary"]["stats"]["prompt_tokens"] == one_message


class OpsStatusDouble:
    """custom_ops.status() as the brief documents it (.ok .reason .fix .kernel .cpu)."""

    def __init__(self, ok, reason="", fix="", kernel=None, cpu="Test CPU 9000"):
        self.ok, self.reason, self.fix, self.kernel, self.cpu = ok, reason, fix, kernel, cpu


def test_hardware_line_from_custom_ops_status(cache, monkeypatch):
    import custom_ops

    monkeypatch.setattr(custom_ops, "status", lambda: OpsStatusDouble(True, kernel="avx512vnni"),
                        raising=False)
    r = models.resolve_model("demo", progress=lambda m: None)
    pg = Playground("demo", threads=1, resolver=lambda spec, variants, progress: r)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    assert "Test CPU 9000 · BitLinear kernel: avx512vnni · 1 thread per engine" in pg.banner_markdown()
    assert pg.status()["hardware"] == {"cpu": "Test CPU 9000", "kernel": "avx512vnni", "threads": 1,
                                       "custom_ops": "ok"}
    assert "Test CPU 9000" in " ".join(pg.log_lines)  # and in the start-up log


def test_without_the_custom_op_the_page_serves_the_baselines_with_a_banner(cache, monkeypatch):
    import custom_ops

    from playground.conversation import model_messages, pane_messages

    monkeypatch.setattr(custom_ops, "status", lambda: OpsStatusDouble(
        False, reason="no C++ compiler found", fix="apt-get install g++"), raising=False)
    r = models.resolve_model("demo", progress=lambda m: None)
    pg = Playground("demo", threads=1, resolver=lambda spec, variants, progress: r)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    assert "ternary" not in pg.engines and "int2" in pg.engines
    banner = pg.banner_markdown()
    assert "ternary engine is unavailable" in banner and "no C++ compiler found" in banner
    assert "apt-get install g++" in banner and "BitLinear kernel: unavailable" in banner
    turns, _ = list(pg.compare("Hi", [], "", "int2", ChatSettings(max_new_tokens=4, seed=1)))[-1]
    answers = turns[-1]["answers"]
    assert answers["ternary"]["state"] == "skipped" and answers["int2"]["stats"]["new_tokens"] >= 1
    assert "unavailable" in pane_messages(turns, "ternary")[-1]["content"]
    assert model_messages(turns)[-1]["content"] == answers["int2"]["text"]  # its answers are the history
    assert list(pg.api_models().values())[0].variant == "int2"


def test_send_is_off_while_the_model_is_prepared():
    """Issue 11.7: while the model is being prepared the page cannot send (the button says
    why), and a /chat call gets a notice instead of an error."""
    from playground.ui import build_demo

    pg = Playground("org/model")
    pg.state = "preparing"
    demo = build_demo(pg)
    send = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "send")
    assert send.interactive is False and "Preparing" in send.value
    with pytest.raises(Exception, match="still being prepared"):
        next(pg.compare("hi", [], "", "int2", ChatSettings()))


@pytest.mark.parametrize("batch", [2, 0])
def test_page_ternary_runs_through_the_batcher_and_baselines_stay_plain(cache, batch):
    """batch > 0: the page's ternary engine is a BatchedEngine (the object the API serves too),
    its answer equals the plain engine's, token for token, and reports the batch it ran in;
    the baseline stays a plain Engine behind a one-slot gate of its own. batch 0: plain engines,
    the same answers, no batch stats."""
    from runtime import Engine, GenerationSettings
    from runtime.batcher import BatchedEngine

    r = models.resolve_model("demo", progress=lambda m: None)
    pg = Playground("demo", threads=1, batch=batch, resolver=lambda spec, variants, progress: r)
    pg.start(background=False)
    assert pg.state == "ready", pg.error
    ternary = pg.engines["ternary"]
    assert isinstance(ternary, BatchedEngine) == bool(batch)
    assert next(iter(pg.api_models().values())) is ternary  # page and API: one batch
    assert pg.gate.concurrency == max(batch, 1) and pg.baseline_gate.concurrency == 1
    assert ("one batch" in pg.banner_markdown()) == bool(batch)
    turns, _ = list(pg.compare("Hi", [], "", "int2", ChatSettings(max_new_tokens=12, temperature=0),
                               session="s"))[-1]
    answers = turns[-1]["answers"]
    plain = Engine(r.folder, "ternary", threads=1)
    prompt = [{"role": "user", "content": "Hi"}]
    expected = plain.generate(messages=prompt, settings=GenerationSettings(max_new_tokens=12, temperature=0,
                                                                           truncate=True)).text
    assert answers["ternary"]["text"] == expected
    assert isinstance(pg.engines["int2"], Engine)
    assert "max_batch_size" not in answers["int2"]["stats"]
    if batch:
        s = answers["ternary"]["stats"]
        assert s["new_tokens"] < 2 or s["max_batch_size"] == 1, s  # it ran alone
    else:
        assert "max_batch_size" not in answers["ternary"]["stats"]
    assert pg.gate.idle() and pg.baseline_gate.idle()
