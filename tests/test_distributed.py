"""Two CPU processes (gloo): the trainer completes and whitens advantages with global statistics; under DeepSpeed ZeRO-2
and ZeRO-3 (DS_ACCELERATOR=cpu) it trains, saves weights that reload to the trained model, and resumes."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import trl_gae_ext


WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
DS_WORKER = os.path.join(os.path.dirname(__file__), "ds_worker.py")
FSDP_CPU_WORKER = os.path.join(os.path.dirname(__file__), "fsdp_cpu_worker.py")
FSDP2_FORCED_WORKER = os.path.join(os.path.dirname(__file__), "fsdp2_forced_worker.py")
DS_ENV = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed would otherwise look for an accelerator it can not find


def launch(tmp_path, argv: list[str] | None = None, env: dict | None = None, timeout: float = 180.0) -> None:
    """Start both ranks of `python argv` (default: ddp_worker.py TMP_PATH) the way torchrun does (its environment
    variables, plus `env`), each writing its log to a file.

    Starting them here rather than through torchrun keeps every process in our hands: torchrun puts its workers in
    sessions of their own, so a stalled worker survives killing torchrun and holds its pipes open.
    """
    with socket.socket() as sock:  # a free port, so concurrent runs on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    base = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WORLD_SIZE="2")
    # the workers import the package this process imported (a checkout may differ from the installed one)
    package_root = os.path.dirname(os.path.dirname(trl_gae_ext.__file__))
    base["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    base.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo", **(env or {})
    )
    argv = argv or [WORKER, str(tmp_path)]
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=log, stderr=log))
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
    launch(tmp_path)
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
    # per-process whitening would give each process a mean of 0 up to float32 rounding (~1e-8)
    assert max(abs(m) for m in local_means) > 1e-4
    # DDP kept the weights in sync, and episodes count both processes
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)
    assert ranks[0]["logged_episode"][-1] == 16


requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (`pip install deepspeed`)"
)


@pytest.fixture(scope="module")
def deepspeed_cpu_ops():
    """DeepSpeed's CPU communication op, compiled once (minutes, cached in ~/.cache/torch_extensions) before two
    processes would race to compile it."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **DS_ENV), check=True, capture_output=True)


def _probe_reloaded(final: str, layout: str, tokenizer_dir: str, tmp_path) -> dict:
    """What the saved folder gives back on the worker's probe: the policy through transformers / PEFT alone, the
    critic through a fresh single-process trainer's `load_critic`."""
    from conftest import make_prompts, offline_args
    from ds_worker import PROBE, length_reward
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_gae_ext import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tokenizer(PROBE, return_tensors="pt")
    if layout == "adapter":
        policy = AutoPeftModelForCausalLM.from_pretrained(final, is_trainable=True)
    else:
        policy = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        logits = policy(**enc).logits
    trainer = PPOTrainer(
        policy, length_reward, args=offline_args(tmp_path, value_head=layout, per_device_train_batch_size=2),
        train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}), processing_class=tokenizer,
    )  # fmt: skip
    trainer.load_critic(final)
    wrapper = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        values = wrapper(enc["input_ids"], enc["attention_mask"], num_response_tokens=3)["values"]
    return {"logits": logits, "values": values}


@requires_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["adapter", "separate"])
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_saves_reloads_and_resumes(stage, layout, tiny_model_dir, tmp_path, deepspeed_cpu_ops):
    launch(tmp_path, [DS_WORKER, str(tmp_path), tiny_model_dir, str(stage), layout], env=DS_ENV, timeout=420)
    result = json.loads((tmp_path / "result.json").read_text())
    probes = torch.load(tmp_path / "probes.pt")
    assert result["global_steps"] == [2, 2]
    assert result["partitioned"] == (stage == 3)  # ZeRO-3 partitioned the policy as it loaded (zero.Init)
    final = str(tmp_path / "final")
    files = ["adapter_model.safetensors", "critic/adapter_model.safetensors"] if layout == "adapter" else [
        "model.safetensors", "critic/model.safetensors"
    ]  # fmt: skip
    for file in [*files, "critic/value_head.safetensors"]:
        tensors = load_file(os.path.join(final, file))
        assert tensors and all(t.numel() > 0 for t in tensors.values()), file
    # the saved folder is the trained model: policy logits and critic values as the workers computed them
    reloaded = _probe_reloaded(final, layout, tiny_model_dir, tmp_path)
    trained = probes["trained"]
    torch.testing.assert_close(reloaded["logits"], trained["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded["values"], trained["values"], rtol=0, atol=1e-5)
    initial = _probe_reloaded_base(tiny_model_dir)
    assert (trained["logits"] - initial).abs().max() > 1e-3  # training moved the policy
    # resuming from the first checkpoint retraces the second iteration
    torch.testing.assert_close(probes["resumed"]["logits"], trained["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(probes["resumed"]["values"], trained["values"], rtol=0, atol=1e-6)
    if stage == 3:
        assert "ZeRO-3" in result["refused"]  # saving partitioned weights outside `save_model` is refused


def _probe_reloaded_base(model_dir: str) -> torch.Tensor:
    from ds_worker import PROBE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enc = AutoTokenizer.from_pretrained(model_dir)(PROBE, return_tensors="pt")
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir)(**enc).logits


def test_fsdp_that_accelerate_did_not_turn_on_is_refused(tiny_model_dir, tmp_path):
    """accelerate turns FSDP on only on GPU-like devices: two CPU processes with `fsdp=True` would silently train as
    plain data parallel (the Trainer itself refuses `fsdp` in one process)."""
    launch(tmp_path, [FSDP_CPU_WORKER, str(tmp_path), tiny_model_dir])
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["distributed_type"] == "MULTI_CPU"
        assert result["error"] is not None and "nothing would be sharded" in result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["adapter", "separate"])
def test_fsdp2_forced_on_cpu_trains_and_saves_the_trained_model(layout, tiny_model_dir, tmp_path):
    """FSDP2 as far as this machine runs it: the accelerator state switched to FSDP2 after the trainer is built (see
    fsdp2_forced_worker.py). Generation from the sharded root, training and saving run; the saved folder reloads to
    the trained model."""
    from ds_worker import PROBE
    from transformers import AutoTokenizer

    launch(tmp_path, [FSDP2_FORCED_WORKER, str(tmp_path), tiny_model_dir, layout], timeout=300)
    trained = torch.load(tmp_path / "probes.pt")
    reloaded = _probe_reloaded(str(tmp_path / "final"), layout, tiny_model_dir, tmp_path)
    torch.testing.assert_close(reloaded["values"], trained["values"], rtol=0, atol=1e-5)
    logprobs = torch.log_softmax(reloaded["logits"][:, -4:-1].float(), -1)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROBE, return_tensors="pt")["input_ids"][:, -3:]
    torch.testing.assert_close(logprobs.gather(-1, ids[..., None])[..., 0], trained["logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp2"])
def test_sharding_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(
        os.path.join(os.path.dirname(WORKER), "..", "examples", "accelerate", f"{name}.yaml")
    )
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "deepspeed_zero3":  # partitioned while the model loads (the reference and critic reload from its id)
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_init_flag"]
    else:
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
