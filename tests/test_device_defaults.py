"""Defaults sized for the device: a stage run with default flags on a CPU must not silently take hours."""
import argparse

import pytest

from picochat import common
from picochat.stages import base_eval, chat_eval, chat_sft

def test_fill_sized_defaults_by_device():
    table = dict(eval_tokens=(20971520, 65536), max_problems=(-1, 100))
    for device, want in (("cpu", (65536, 100)), ("mps", (65536, 100)), ("cuda", (20971520, -1))):
        args = argparse.Namespace(eval_tokens=None, max_problems=None)
        lines = common.fill_sized_defaults(args, device, table)
        assert (args.eval_tokens, args.max_problems) == want
        assert len(lines) == (0 if device == "cuda" else 2)
    args = argparse.Namespace(eval_tokens=1234, max_problems=None)  # what the user passed is kept
    lines = common.fill_sized_defaults(args, "cpu", table)
    assert args.eval_tokens == 1234 and args.max_problems == 100 and len(lines) == 1 and "--max-problems 100" in lines[0]

@pytest.mark.parametrize("stage", [chat_sft, base_eval, chat_eval])
def test_stage_eval_sizes_are_small_off_cuda(stage):
    for dest, (gpu, small) in stage.SIZED.items():
        assert small != -1, f"{stage.__name__} --{dest}: 'all' on CPU"
        assert gpu == -1 or small <= gpu / 2, f"{stage.__name__} --{dest}: the CPU default is not smaller"

@pytest.mark.parametrize("parse", [lambda: chat_sft.parse_args([]), lambda: base_eval.build_parser().parse_args([])])
def test_sized_flags_default_to_the_device_rule(parse):
    args = parse()
    stage = chat_sft if hasattr(args, "chatcore_max_cat") else base_eval
    assert all(getattr(args, dest) is None for dest in stage.SIZED)  # None = decided by device after start-up

def test_long_run_notice():
    assert common.long_run_notice("cpu", 100, 1.0, "pass --num-iterations") == ""        # 100 s: fine
    msg = common.long_run_notice("cpu", 12000, 1.5, "pass --num-iterations")
    assert "5.0 h" in msg and "12,000" in msg and "--num-iterations" in msg
    assert common.long_run_notice("cuda", 12000, 1.5, "x") == ""                          # GPU recipes are sized for GPUs
