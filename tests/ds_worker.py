"""Started twice by test_deepspeed.py (RANK/WORLD_SIZE/MASTER_* set, as torchrun sets them, and DS_ACCELERATOR=cpu):
two CPU processes train PPO under DeepSpeed ZeRO with gloo.

`ds_worker.py OUT MODEL_DIR STAGE LAYOUT`: trainer A trains two PPO iterations from MODEL_DIR (a checkpoint after
each) and saves the final model to OUT/final; trainer B resumes from A's first checkpoint and trains the second
iteration. Rank 0 writes what both computed on fixed probe inputs (policy logits, critic values) to OUT/probes.pt.
"""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_prompts  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from trl_gae_ext import PPOConfig, PPOTrainer, saving  # noqa: E402


PROBE = "say a word : alpha beta gamma"


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def make_trainer(out_dir: str, model_dir: str, stage: int, layout: str) -> PPOTrainer:
    zero = {"stage": stage}
    if stage == 3:  # partition every parameter of the tiny model (the default threshold keeps small ones whole)
        zero["stage3_param_persistence_threshold"] = 0
    args = PPOConfig(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=4,
        total_episodes=8,  # two PPO iterations of 2 prompts x 2 processes
        learning_rate=1e-2,
        temperature=1.0,
        value_head=layout,
        ddp_backend="gloo",
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=1,  # one optimizer step per PPO iteration
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        deepspeed={
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        },
    )
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return PPOTrainer(
        model_dir, length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": make_prompts(8)}),
        peft_config=peft if layout == "adapter" else None,
    )  # fmt: skip


@torch.no_grad()
def probe(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    """Policy logits and critic values on `PROBE` (every process calls it: ZeRO-3 gathers weights in the forward)."""
    enc = trainer.processing_class(PROBE, return_tensors="pt")
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    wrapper.eval()
    logits = wrapper.policy(**enc).logits
    values = wrapper(enc["input_ids"], enc["attention_mask"], num_response_tokens=3)["values"]
    return {"logits": logits.float(), "values": values.float()}


def main(out_dir: str, model_dir: str, stage: int, layout: str) -> None:
    result = {}
    first = make_trainer(out_dir, model_dir, stage, layout)
    result["partitioned"] = any(p.numel() == 0 for p in first.model.parameters())
    first.train()
    first.save_model(os.path.join(out_dir, "final"))
    trained = probe(first)
    if stage == 3:  # outside `save_model` the shards stay empty: saving must refuse rather than write them
        try:
            saving.save_pretrained(first.accelerator.unwrap_model(first.model), os.path.join(out_dir, "refused"))
            result["refused"] = None
        except RuntimeError as error:
            result["refused"] = str(error)
    second = make_trainer(out_dir, model_dir, stage, layout)
    second.train(resume_from_checkpoint=os.path.join(out_dir, "run", "checkpoint-1"))
    resumed = probe(second)
    if second.args.process_index == 0:
        torch.save({"trained": trained, "resumed": resumed}, os.path.join(out_dir, "probes.pt"))
        result["global_steps"] = [first.state.global_step, second.state.global_step]
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    # leave before the engines are freed, as ddp_worker.py does (gloo teardown may deadlock at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
