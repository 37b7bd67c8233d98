"""The API on Ray Serve (server/ray_serve.py): two replicas of the demo model, streamed with the
official openai client, inside a network namespace this test creates (Ray binds the host's
address whatever it is told, so everything runs where only loopback exists).

Ray is optional (requirements-ray.txt, installed by .ci/run): the end-to-end test skips only
when the `ray` package is not installed at all; an installed Ray that fails, fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from server.ray_serve import HEADROOM, RayOptions, parse_autoscale
from tests.ray_probe import RESULT_PREFIX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "shakespeare-bitnet")
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")


# -- command line ----------------------------------------------------------------------------
def test_parse_autoscale():
    assert parse_autoscale("1:4") == (1, 4)
    assert parse_autoscale("0:2") == (0, 2)
    for bad in ("4", "a:b", "1:", ":3", "1-4"):
        with pytest.raises(ValueError, match="MIN:MAX"):
            parse_autoscale(bad)


@pytest.mark.parametrize("options, message", [
    (RayOptions(replicas=0), "--replicas"),
    (RayOptions(threads_per_replica=0), "--threads-per-replica"),
    (RayOptions(autoscale=(3, 1)), "--autoscale"),
    (RayOptions(autoscale=(0, 0)), "--autoscale"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        options.validate()


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--autoscale", "4"], "--autoscale takes MIN:MAX"),
    (["--autoscale", "5:2"], "--autoscale MIN:MAX needs"),
    (["--threads", "2"], "use --threads-per-replica"),
    ([], "is not an exported model folder"),
])
def test_cli_bad_ray_flags_fail_in_one_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "server", str(tmp_path), "--ray", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


@needs_ray
def test_deployment_options_follow_the_flags():
    from server import Limits
    from server.ray_serve import build_app

    limits = Limits(concurrency=1, queue_size=5)
    fixed = build_app(DEMO, options=RayOptions(replicas=3, threads_per_replica=2), limits=limits)
    cfg = fixed._bound_deployment._deployment_config
    assert cfg.num_replicas == 3
    assert cfg.max_ongoing_requests == 1 + 5 + HEADROOM
    actor = fixed._bound_deployment.ray_actor_options
    assert actor["num_cpus"] == 2
    assert REPO in actor["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)

    scaled = build_app(DEMO, options=RayOptions(autoscale=(1, 4)), limits=limits)
    auto = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 2)


@needs_ray
def test_app_builder_for_serve_run_and_kuberay():
    from server.ray_serve import app_builder

    app = app_builder({"model_dir": DEMO, "autoscale": "1:3", "threads_per_replica": "2"})
    dep = app._bound_deployment
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep.ray_actor_options["num_cpus"] == 2
    with pytest.raises(ValueError, match="model_dir"):
        app_builder({})


# -- end to end, in a network namespace ------------------------------------------------------
@needs_ray
def test_two_replicas_stream_share_load_and_cancel_on_disconnect(tmp_path):
    assert shutil.which("unshare") and shutil.which("ip"), "needs util-linux unshare and iproute2 ip"
    model = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "export", DEMO, "--out", str(model), "--variants", "ternary"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    probe = f"{sys.executable} tests/ray_probe.py {model} --replicas 2 --requests 12 --clients 6"
    r = subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {probe}"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"probe failed (rc {r.returncode}):\n{r.stderr[-3000:]}"
    lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"no result from the probe:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    result = json.loads(lines[0][len(RESULT_PREFIX):])

    assert result["errors"] == [] and result["ok"] == result["requests"] == 12
    assert all(n and n >= 1 for n in result["completion_tokens"]), result["completion_tokens"]
    assert len(result["per_replica"]) == 2, f"one replica served everything: {result['per_replica']}"
    assert all(n >= 1 for n in result["per_replica"].values())
    # each replica runs the batcher (4 slots): concurrent requests on a replica shared decode steps
    assert all(r["batcher"] and r["batcher"]["slots"] == 4 for r in result["replicas"].values()), result["replicas"]
    assert max(r["max_batch_size"] for r in result["replicas"].values()) > 1, result["replicas"]
    assert max(b or 0 for b in result["max_batch_sizes"]) > 1, result["max_batch_sizes"]

    # the server's own checks answer behind Ray exactly as in the single-process server
    assert result["error_answers"] == result["error_answers_single_process"]
    assert result["error_answers"]["bad_json"] == [400, "invalid_json"]
    assert result["error_answers"]["wrong_method"][0] == 405

    gone = result["disconnect"]
    job = gone["job"]
    assert job is not None, f"the replica never reported the disconnected generation: {gone}"
    assert job["stopped_by"] == "client" and job["finish_reason"] == "cancelled", job
    assert job["new_tokens"] < gone["max_tokens"]
    assert job["tokens_after_cancel"] is not None and job["tokens_after_cancel"] <= 2, job
