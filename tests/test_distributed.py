"""Two CPU processes (gloo): the trainer completes and whitens advantages with global statistics."""

import json
import os
import socket
import subprocess
import sys

import pytest


WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _launch(tmp_path, timeout: float = 180.0) -> None:
    """Start both ranks the way torchrun does (its environment variables), each writing its log to a file.

    Starting them here rather than through torchrun keeps every process in our hands: torchrun puts its workers in
    sessions of their own, so a stalled worker survives killing torchrun and holds its pipes open.
    """
    with socket.socket() as sock:  # a free port, so concurrent runs on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    base = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WORLD_SIZE="2")
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path)], env=env, stdout=log, stderr=log))
        logs.append(log)
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            tail = (tmp_path / f"rank{rank}.log").read_text()[-4000:]
            pytest.fail(f"rank {rank} exited with {proc.returncode} (killed after {timeout:.0f} s if -9):\n{tail}")


def test_two_process_run_whitens_with_global_statistics(tmp_path):
    _launch(tmp_path)
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
