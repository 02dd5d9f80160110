"""The speed settings: the process settings of vae_dist.runtime doing what they claim,
the Learner's step calling the torch optimizer directly only where Accelerate's wrapper has
nothing to do, and the train meter's device-side sums."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, cli_env


def _run_python(code: str, *argv: str, threads: int = 2) -> str:
    """Run code in a fresh interpreter (process-wide settings stay out of pytest's); its stdout."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv], cwd=REPO, env=cli_env(OMP_NUM_THREADS=str(threads)),
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


# A million subnormals times one: with the mode on (flush-to-zero and denormals-are-zero)
# every product is 0, on every thread that computed a slice of it. The subnormal is made
# from its bits: writing 1e-39 as a float would itself be flushed on this thread.
SUBNORMAL_PRODUCT = """
    import torch
    def nonzero_products():
        x = torch.full((1 << 20,), 0x00400000, dtype=torch.int32).view(torch.float32)  # 5.9e-39
        return int((x * 1.0).count_nonzero())
"""


@pytest.mark.slow
def test_flush_denormal_reaches_all_threads_when_set_first():
    out = _run_python(
        SUBNORMAL_PRODUCT
        + """
    from vae_dist.training.runtime import prepare_process
    prepare_process(flush_denormal=True)
    on = nonzero_products()
    torch.set_flush_denormal(False)  # only this thread is switched back: check it alone
    torch.set_num_threads(1)
    print(on, nonzero_products(), torch.get_num_threads())
    """
    )
    on, off, _ = map(int, out.split())
    assert on == 0, f"{on} subnormal products survived with the mode on"
    assert off == 1 << 20, "with the mode off the products stay subnormal"


def test_train_step_bypasses_the_optimizer_wrapper_only_when_it_is_a_pass_through():
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vae_dist.training.learner import stepping_optimizer

    acc = Accelerator(cpu=True)
    opt = acc.prepare(torch.optim.Adam(torch.nn.Linear(2, 2).parameters()))
    assert stepping_optimizer(acc, opt) is opt.optimizer
    # Where the wrapper does something, it is kept: gradient accumulation, XLA, fp16's scaler.
    for steps, kind in ((2, DistributedType.NO), (1, DistributedType.XLA)):
        assert stepping_optimizer(SimpleNamespace(gradient_accumulation_steps=steps, distributed_type=kind), opt) is opt
    opt.scaler = object()
    assert stepping_optimizer(acc, opt) is opt


def test_user_allocator_settings_are_left_alone(monkeypatch):
    from vae_dist.training.runtime import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert keep_freed_memory() is False


def test_interval_loss_comes_from_snapshots_of_the_running_sums():
    from vae_dist.training.learner import TrainMeter

    meter = TrainMeter(torch.device("cpu"), 3)
    meter.start_epoch([1000.0, 0.0, 0.0, 8.0])  # a resumed epoch's totals
    for step, (objective, n) in enumerate([(640.0, 64), (320.0, 64)], start=1):
        meter.add(torch.tensor([objective, 0.0, 0.0], dtype=torch.float64), torch.tensor(1.0), n, 2, step)
    assert meter.take_interval().tolist() == [960.0, 128.0]  # only this interval, not the resumed totals
    meter.add(torch.tensor([64.0, 0.0, 0.0], dtype=torch.float64), torch.tensor(float("nan")), 64, 2, 3)
    assert meter.take_interval().tolist() == [64.0, 64.0]
    assert meter.totals().tolist() == [2024.0, 0.0, 0.0, 200.0]
    assert meter.samples == 3 * 64 * 2  # all ranks' images since the (resumed) start
    assert meter.first_nonfinite_step().tolist() == [3]
    assert meter.first_nonfinite_step().tolist() == [-1]  # each loss is checked once
