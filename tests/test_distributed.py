"""Two CPU processes (torchrun, gloo): the trainer completes and whitens advantages with global statistics."""

import json
import os
import subprocess
import sys

import pytest


def test_two_process_run_whitens_with_global_statistics(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", worker]
    proc = subprocess.run(cmd + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # each process answered different prompts (the sampler splits every rollout batch)
    assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])
    # whitening used the statistics of both processes: global mean 0, variance 1; the local ones are not
    n = sum(r["count"] for r in ranks)
    mean = sum(r["adv_sum"] for r in ranks) / n
    var = (sum(r["adv_sq_sum"] for r in ranks) - n * mean**2) / (n - 1)
    assert abs(mean) < 1e-5 and var == pytest.approx(1.0, abs=1e-4)
    local_means = [r["adv_sum"] / r["count"] for r in ranks]
    assert max(abs(m) for m in local_means) > 1e-3
    # DDP kept the weights in sync, and episodes count both processes
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)
    assert ranks[0]["logged_episode"][-1] == 16
