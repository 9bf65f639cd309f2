"""`benchmarks/memory_gpu.py`, the prepared GPU measurement, on the CPU: its arguments, the shapes and settings it
measures, its dry run (the planner's figures it will be compared with), and its whole code path at a tiny shape."""

import json

import pytest
import torch
from conftest import load_benchmark

from trl_gae_ext.planner import GIB, REFERENCE_CONFIGS, estimate_ppo_memory


@pytest.fixture(scope="module")
def memory_gpu():
    return load_benchmark("memory_gpu")


def test_defaults_are_the_issue_setup(memory_gpu):
    """One command measures 7B and 14B with batch 8 = micro 4 x 2 mini-batches, prompt 256 + response 512."""
    args = memory_gpu.parse_args([])
    assert args.models == ["qwen2.5-7b", "qwen2.5-14b"] and not args.tiny and not args.dry_run
    assert (args.batch_size, args.num_mini_batches, args.micro_batch_size) == (8, 2, None)
    assert (args.prompt_length, args.response_length, args.lora_r, args.steps) == (256, 512, 16, 2)
    assert memory_gpu.shapes_of(args) == {m: REFERENCE_CONFIGS[m] for m in args.models}
    tiny = memory_gpu.parse_args(["--tiny"])
    assert memory_gpu.shapes_of(tiny) == {"tiny": memory_gpu.TINY_CONFIG} and tiny.batch_size == 4


@pytest.mark.parametrize("argv", [["--batch-size", "6", "--micro-batch-size", "4"], ["--steps", "1"]])
def test_bad_arguments_exit(memory_gpu, argv):
    with pytest.raises(SystemExit) as exit_:
        memory_gpu.parse_args(argv)
    assert exit_.value.code == 2


def test_dry_run_prints_the_planner(memory_gpu, capsys):
    """The dry run builds nothing and prints, per shape, the planner's allocated bytes per phase for the same settings
    as the measurement (the trainer's own log-prob and upcast defaults), with the CUDA terms on the peak."""
    from benchmarks.memory_cpu import trainer_defaults

    assert memory_gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen2.5-7b", "qwen2.5-14b"):
        est = estimate_ppo_memory(REFERENCE_CONFIGS[name], batch_size=8, prompt_length=256, response_length=512,
                                  num_mini_batches=2, **trainer_defaults())  # fmt: skip
        assert est.settings.micro_batch == 4
        line = next(line for line in out.splitlines() if line.strip().startswith(name + ":"))
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.phases_allocated.items())
        assert phases in line and f"peak {est.peak / GIB:.2f} GiB" in line
    assert "batch 8 = micro 4 x 2" in out


def test_without_cuda_nothing_is_measured(memory_gpu, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the command would measure")
    assert memory_gpu.main(["--models", "qwen2.5-7b"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


def test_tiny_run_measures_every_phase(memory_gpu, tmp_path, capsys):
    """`--tiny` on the CPU runs the whole measurement (random 4-bit model, instrumented PPOTrainer, allocator records)
    and reports each phase within 15% of the planner, as on a GPU it would report against the CUDA figures."""
    pytest.importorskip("bitsandbytes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, intra-op threads mostly wait on each other; bytes do not depend on it
    try:
        assert memory_gpu.main(["--tiny", "--json", str(tmp_path / "out.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "out.json").read_text())["results"]["tiny"]
    for phase in ("generation", "scoring", "training"):
        row = result["phases"][phase]
        assert row["allocated"] == pytest.approx(row["planned"], rel=0.15), (phase, row)
    assert "training" in capsys.readouterr().out
