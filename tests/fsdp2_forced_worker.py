"""Started twice by test_distributed.py (RANK/WORLD_SIZE/MASTER_* set, as torchrun sets them): PPO under FSDP2 on two
CPU processes (gloo).

accelerate turns FSDP on only on GPU-like devices, so the trainer is built as for plain data parallel and the
accelerator state is then switched to FSDP2 with the plugin accelerate would build on GPUs (`fully_shard` itself runs
on the CPU). An approximation of a GPU run, the only FSDP2 run this machine allows: training, generation from the
sharded root, and saving go through the FSDP2 code paths.

`fsdp2_forced_worker.py OUT MODEL_DIR LAYOUT`: trains two PPO iterations, saves to OUT/final, and rank 0 writes the
trained model's log-probs and values on a probe to OUT/probes.pt.
"""

import os
import pathlib
import sys

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_prompts, offline_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from ds_worker import PROBE, length_reward  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from trl_gae_ext import PPOTrainer  # noqa: E402


def main(out_dir: str, model_dir: str, layout: str) -> None:
    args = offline_args(
        pathlib.Path(out_dir), per_device_train_batch_size=2, num_mini_batches=1, num_ppo_epochs=1,
        response_length=4, total_episodes=8, learning_rate=1e-2, value_head=layout, ddp_backend="gloo",
    )  # fmt: skip
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        model_dir, length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}),
        peft_config=peft if layout == "adapter" else None,
    )  # fmt: skip
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
    )  # fmt: skip
    trainer.is_fsdp_enabled = True
    trainer.train()
    assert isinstance(trainer.model_wrapped, FSDPModule)  # the run was sharded
    trainer.save_model(os.path.join(out_dir, "final"))
    enc = trainer.processing_class(PROBE, return_tensors="pt")
    with torch.no_grad():  # through the root's forward: FSDP2 gathers the shards
        out = trainer.model_wrapped.eval()(enc["input_ids"], enc["attention_mask"], num_response_tokens=3)
    if args.process_index == 0:
        torch.save({k: v.float() for k, v in out.items()}, os.path.join(out_dir, "probes.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], sys.argv[3])
