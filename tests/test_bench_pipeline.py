"""benchmarks/bench_pipeline.py runs end to end on the tiny model (one small config) and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_pipeline_writes_a_sane_record(tmp_path):
    out = tmp_path / "pipeline.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(REPO / "benchmarks" / "bench_pipeline.py"), "--model", "tiny", "--frames", "2",
               "--steps", "1", "--size", "64", "--device", "cpu", "--threads", "1", "--reps", "1",
               "--chunk-size", "1", "--latents-placement", "disk", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["command"].startswith("benchmarks/bench_pipeline.py --model tiny")
    env_info = result["environment"]
    assert env_info["device"] and env_info["torch"] and env_info["diffusers"]
    (record,) = result["records"]
    assert record["status"] == "ok", record
    assert record["frames"] == 2 and record["steps"] == 1 and record["chunk_used"] == {"inversion": 1, "edit": 1}
    assert all(record["seconds"][phase] > 0 for phase in ("encode", "inversion", "edit", "decode"))
    assert record["inversion_s_per_frame_step"] > 0 and record["edit_s_per_frame_step"] > 0
    assert record["peak_rss_bytes"] >= record["rss_after_setup_bytes"] > 0
    assert "peak_gpu_allocated_bytes" not in record  # CPU run
    for phase, branches in (("inversion", 1), ("edit", 3)):
        bare = record["bare_unet"][phase]
        assert bare["status"] == "ok" and bare["branches"] == branches and bare["frames_per_call"] == 1
        assert bare["s_per_frame_step"] > 0 and record[f"{phase}_vs_bare"] > 0
    assert record["store_bytes"] == 0 and record["latents_bytes"] == 2 * 2 * 4 * 8 * 8 * 4  # (T+1) F 4 h w fp32
    assert record["official_store_bytes_50_steps"] == 50 * record["official_store_bytes"] > 0


def test_a_failing_config_is_recorded_not_raised():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = dict(model="tiny", frames=2, steps=1, chunk_size=None, size=64, dtype="fp32", store="recompute",
                  latents_dtype=None, latents_placement="host", device="cpu", threads=1, reps=1)
    record = bench.run_config(config, timeout=0.5)
    assert record["status"] == "error: timeout after 0.5 s" and record["frames"] == 2
