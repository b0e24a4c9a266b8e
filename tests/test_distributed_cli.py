"""`torchrun --nproc_per_node 2 -m fatezero_fast edit ...` (gloo) writes the latents one process writes."""
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARGS = ["edit", "--frames", "3", "--steps", "3", "--target-prompt", "a blue car driving down a road",
        "--source-prompt", "a red car driving down a road", "--blend-words", "car", "car", "--save-latents"]


def run(command, out: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command + ARGS + ["-o", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    run([sys.executable, "-m", "fatezero_fast"], tmp_path / "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fatezero_fast"], tmp_path / "two")
    one_latents = torch.load(tmp_path / "one" / "edit_00" / "latents.pt")
    two_latents = torch.load(tmp_path / "two" / "edit_00" / "latents.pt")
    assert ((one_latents - two_latents).abs().max() / one_latents.abs().max()).item() <= 1e-5
    assert two.stdout.count("edit 0:") == 1  # rank 0 speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else left behind
