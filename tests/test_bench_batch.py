"""bench/bench_batch.py still runs: a tiny load (B = 1 and 2, a few tokens) on the demo model,
both paths, each in its own worker process, ending with the table and the targets line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from export import export_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_bench_batch_smoke(tmp_path):
    folder = export_checkpoint(str(ROOT / "models" / "shakespeare-bitnet"), str(tmp_path / "demo"), ("ternary",),
                               progress=lambda m: None)
    out = subprocess.run([sys.executable, "bench/bench_batch.py", folder, "--batches", "1,8", "--threads", "1",
                          "--prompt-tokens", "8", "--new-tokens", "6", "--newcomer-tokens", "2",
                          "--json-out", str(tmp_path / "rows.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["path"], r["batch"]) for r in rows] == [("batched", 1), ("loop", 1), ("batched", 8), ("loop", 8)]
    for r in rows:
        assert r["aggregate_tok_s"] > 0 and r["newcomer_ttft_s"] > 0 and r["peak_rss_mb"] > 0, r
    assert rows[2]["mean_batch"] > 1 and rows[2]["kv_cache_mb"] > 0
    # The one-stream steps were timed (at B = 8 six tokens may end before the eighth prompt is
    # in: then there is no 8-row step to time).
    assert rows[0]["step_ms"] > 0
    assert "B-row step ms" in out.stdout
    assert "| batched | 8 |" in out.stdout and "checks (issue 13 targets)" in out.stdout
