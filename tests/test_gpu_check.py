"""benchmarks/gpu_check.sh --rehearsal: the GPU check's every step, end to end on the CPU with tiny shapes,
so that the script is known to work before a GPU ever runs it (CI runs this through `make test`)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearsal_runs_every_step_and_writes_json(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("FATEZERO_FAST_TEST_REPORT", None)
    env.pop("TRITON_INTERPRET", None)  # as on a user's machine: the selftest leaves the interpreter out
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--rehearsal"], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_rehearsal.json").read_text())
    assert [s["step"] for s in result["steps"]] == ["build", "selftest", "pytest", "attention", "e2e-recompute",
                                                    "e2e-qk", "temporal"]
    assert all(s["status"] == "ok" and 0 < s["seconds"] <= s["limit_s"] for s in result["steps"]), result["steps"]
    assert result["environment"]["torch"] and result["environment"]["device"] == "cpu"
    assert result["selftest"]["failed"] == 0 and result["selftest"]["passed"] >= 100
    assert set(result["selftest"]["per_backend"]) >= {"sdpa"}
    assert result["pytest"]["counts"].get("failed", 0) == 0 and result["pytest"]["counts"]["skipped"] > 0
    assert {row["shape"] for row in result["attention"]["summary"]} == {"16x16"}
    assert any(r["impl"] == "ours[sdpa] qk" and r["status"] == "ok" for r in result["attention"]["records"])
    for store in ("recompute", "qk"):
        records = result["e2e"][store]
        assert [r["chunk_size"] for r in records] == [None, 1] and all(r["status"] == "ok" for r in records)
        assert all(r["store"] == store and r["peak_rss_bytes"] > 0 and r["seconds"]["edit"] > 0 for r in records)
    rows = result["temporal_attention"]["rows"]
    assert [r["frames"] for r in rows] == [8] * 3 and all(r["sdpa_s"] > 0 and r["cpu_s"] > 0 for r in rows)
    # what the device tool brings back from $OUT: at most 8 plain files, simple names
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    for name in result["files"].values():
        assert name in files
