"""The speed settings: fused Adam and flushed subnormals on by default (and switchable
from the CLI), the process settings of vae_dist.runtime doing what they claim, and
train_step calling the torch optimizer directly only where Accelerate's wrapper has
nothing to do."""

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


def test_flush_denormal_reaches_all_threads_when_set_first():
    out = _run_python(
        SUBNORMAL_PRODUCT
        + """
    from vae_dist.runtime import prepare_process
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


# Page faults per conv training step after a warm-up: a standalone loop like this one is
# the pattern where glibc hands a step's freed buffers back to the kernel (about 3,600
# faults per step on the CPU machine) unless told to keep them (about 10).
FAULTS_PER_STEP = """
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from vae_dist.runtime import keep_freed_memory
        assert keep_freed_memory()
    from vae_dist.config import ModelConfig
    from vae_dist.loss import negative_elbo
    from vae_dist.model import VAE
    torch.manual_seed(0)
    model = VAE.from_config(ModelConfig(kind="conv"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(128, 1, 28, 28)
    def step():
        out = model(x, torch.randn(128, 64))
        negative_elbo(out.logits, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator policy")
def test_freed_memory_is_kept_instead_of_faulted_back_in():
    kept, default = (float(_run_python(FAULTS_PER_STEP, mode)) for mode in ("keep", "default"))
    print(f"\npage faults per conv step: {kept:.0f} with freed memory kept, {default:.0f} without")
    assert kept < 200, kept
    assert default > 10 * kept + 200, (default, kept)  # the control: the pattern does fault without it


def test_user_allocator_settings_are_left_alone(monkeypatch):
    from vae_dist.runtime import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert keep_freed_memory() is False


def test_interval_loss_comes_from_snapshots_of_the_running_sums():
    import torch

    from vae_dist.learner import _Interval

    sums = torch.tensor([1000.0, 0.0, 0.0], dtype=torch.float64)  # a resumed epoch's totals
    interval = _Interval(sums, 8.0)
    for objective, n in [(640.0, 64), (320.0, 64)]:
        sums += torch.tensor([objective, 0.0, 0.0], dtype=torch.float64)
    first = interval.take(sums, 8.0 + 128)
    assert first.tolist() == [960.0, 128.0]  # only this interval, not the resumed totals
    sums += torch.tensor([64.0, 0.0, 0.0], dtype=torch.float64)
    assert interval.take(sums, 8.0 + 192).tolist() == [64.0, 64.0]
