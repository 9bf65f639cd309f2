"""Started twice by test_distributed.py (RANK/WORLD_SIZE/MASTER_* set, as torchrun sets them): two CPU processes
(gloo) build a `PPOTrainer` with `fsdp=True`, which accelerate runs as plain data parallel on the CPU; each writes
the error it got (or null) to rank<N>.json."""

import json
import os
import pathlib
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_prompts, offline_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from ds_worker import length_reward  # noqa: E402

from trl_gae_ext import PPOTrainer  # noqa: E402


def main(out_dir: str, model_dir: str) -> None:
    args = offline_args(
        pathlib.Path(out_dir),
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        fsdp=True,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    try:
        PPOTrainer(model_dir, length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}))
        error = None
    except ValueError as e:
        error = str(e)
    with open(os.path.join(out_dir, f"rank{args.process_index}.json"), "w") as f:
        json.dump({"error": error, "distributed_type": args.distributed_state.distributed_type.value}, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
