"""The speed settings: fused Adam and flushed subnormals on by default (and switchable
from the CLI), the flush mode reaching torch's worker threads, and train_step calling the
torch optimizer directly only where Accelerate's wrapper has nothing to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import vae_dist.train
from vae_dist.cli import main
from vae_dist.config import RESUMABLE_FIELDS, TrainingConfig

from conftest import REPO, cli_env


def test_fast_paths_are_the_defaults():
    c = TrainingConfig()
    assert c.optimizer.fused is True
    assert c.flush_denormal is True
    # Both change only rounding, so a run may be resumed with them switched.
    assert {"optimizer.fused", "flush_denormal"} <= RESUMABLE_FIELDS


@pytest.mark.parametrize(
    "flags, fused, flush",
    [([], True, True), (["--no-fused-adam", "--no-flush-denormal"], False, False), (["--fused-adam"], True, True)],
)
def test_cli_switches(monkeypatch, tmp_path, flags, fused, flush):
    seen: list[TrainingConfig] = []
    monkeypatch.setattr(vae_dist.train, "train", lambda cfg, **kw: seen.append(cfg))
    main(["train", "--artifact-dir", str(tmp_path / "run"), *flags])
    assert len(seen) == 1
    assert seen[0].optimizer.fused is fused and seen[0].flush_denormal is flush


def _run_python(code: str, threads: int = 2) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=cli_env(OMP_NUM_THREADS=str(threads)),
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


def test_flush_denormal_reaches_all_threads_when_set_first():
    out = _run_python(
        SUBNORMAL_PRODUCT
        + """
    from vae_dist.train import set_flush_denormal
    set_flush_denormal(True)
    on = nonzero_products()
    set_flush_denormal(False)  # only this thread is switched back: check it alone
    torch.set_num_threads(1)
    print(on, nonzero_products(), torch.get_num_threads())
    """
    )
    on, off, _ = map(int, out.split())
    assert on == 0, f"{on} subnormal products survived with the mode on"
    assert off == 1 << 20, "with the mode off the products stay subnormal"


def test_flush_denormal_set_late_misses_worker_threads():
    """Why train() sets the mode before any tensor work: threads made earlier keep theirs."""
    out = _run_python(
        SUBNORMAL_PRODUCT
        + """
    (torch.rand(2000, 2000) @ torch.rand(2000, 2000)).sum()  # starts the worker threads
    torch.set_flush_denormal(True)
    print(nonzero_products(), torch.get_num_threads())
    """
    )
    survived, threads = map(int, out.split())
    if threads < 2:
        pytest.skip("one intra-op thread: no worker threads to miss")
    assert 0 < survived < 1 << 20, survived


@pytest.mark.parametrize("accumulate, unwrapped", [(1, True), (2, False)])
def test_train_step_bypasses_the_optimizer_wrapper_only_when_it_is_a_pass_through(accumulate, unwrapped):
    out = _run_python(
        f"""
    import torch
    from accelerate import Accelerator
    from vae_dist.learner import stepping_optimizer
    acc = Accelerator(cpu=True, gradient_accumulation_steps={accumulate})
    model, opt = acc.prepare(torch.nn.Linear(2, 2), torch.optim.Adam(torch.nn.Linear(2, 2).parameters()))
    chosen = stepping_optimizer(acc, opt)
    print(chosen is opt.optimizer, chosen is opt)
    """,
        threads=1,
    )
    assert out.split() == ([str(True), str(False)] if unwrapped else [str(False), str(True)])
