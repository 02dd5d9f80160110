"""The Python API (vae_dist.evaluation.api): load a run, a model file or a checkpoint; a model's
methods; the IW-NLL as evaluate computes it; the README's example as written."""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

import pytest
import torch

import vae_dist
from conftest import REPO, copy_run
from test_learner import _learner
from test_pictures import model_run
from vae_dist.config import TrainingConfig
from vae_dist.errors import TrainingError, VaeDistError
from vae_dist.models import build
from vae_dist.run.modelfile import save_model_file
from vae_dist.evaluation.evaluate import score
from vae_dist.models.protocol import MAX_GENERATOR_SEED, MAX_IMAGES, MAX_IW_SAMPLES


def test_iw_nll_is_the_estimate_evaluate_prints(tmp_path: Path) -> None:
    model = vae_dist.load(model_run(tmp_path))
    images = (torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    expected = score(model.model, model.config, images, iw_samples=20)["iw_nll"]
    assert vae_dist.iw_nll(model, images, k=20) == pytest.approx(expected, rel=1e-12)
    # the same images as floats in [0, 1], flat: the same estimate
    assert vae_dist.iw_nll(model, images.view(12, 784).float() / 255, k=20) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad, needle", [
    (torch.zeros(3, 27, 28), "shaped"),
    (torch.full((2, 784), 2.0), "[0, 1]"),
    (torch.zeros(2, 784, dtype=torch.int64), "uint8"),
    ("not a tensor", "torch.Tensor"),
])
def test_bad_images_are_one_line_errors(tmp_path: Path, bad, needle) -> None:
    model = vae_dist.load(model_run(tmp_path))
    with pytest.raises(VaeDistError, match=re.escape(needle)) as e:
        model.reconstruct(bad)
    assert "\n" not in str(e.value)


def test_images_go_in_in_the_models_shape() -> None:
    from vae_dist.evaluation.api import TrainedVAE

    config = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "image_shape": [3, 4, 5]}})
    model = TrainedVAE(build(config), config, {})
    x = torch.rand(2, 3, 4, 5)
    assert torch.equal(model.reconstruct(x.flatten(1)), model.reconstruct(x)) and model.reconstruct(x).shape == x.shape
    with pytest.raises(VaeDistError, match=re.escape("shaped (N, 60) or (N, 3, 4, 5), got (2, 4, 5)")):
        model.reconstruct(x[:, 0])  # (N, H, W) is a grey model's
    grey = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "image_shape": [1, 4, 5]}})
    assert TrainedVAE(build(grey), grey, {}).reconstruct(x[:, 0]).shape == (2, 1, 4, 5)


@pytest.mark.parametrize("ends", ["returning", "raising"])
def test_train_gives_the_caller_its_process_settings_back(tmp_path: Path, monkeypatch, ends) -> None:
    from vae_dist.training import trainer
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}, "flush_denormal": True})
    save_model_file(tmp_path / "model.safetensors", build(cfg).state_dict(), cfg)

    def run(config: TrainingConfig, **_) -> Path:
        assert torch.tensor(1e-40).item() == 0.0  # the run's setting, while it runs
        torch.ones(1 << 20).sum()  # work on the intra-op threads, as a run's
        if ends == "raising":
            raise TrainingError("loss became non-finite at step 3")
        return tmp_path / "model.safetensors"

    def caller() -> None:  # a fresh thread: no intra-op threads started yet, and the mode is per thread
        torch.set_flush_denormal(False)  # the caller's: subnormals kept
        with contextlib.suppress(TrainingError):
            vae_dist.train(cfg)
        tiny = torch.full((1 << 20,), 1e-20) * 1e-20  # subnormal products, on every intra-op thread
        seen.append((torch.tensor(1e-40).item() > 0, int((tiny == 0).sum())))

    monkeypatch.setattr(trainer, "train", run)
    seen: list[tuple[bool, int]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        thread = threading.Thread(target=caller)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [(True, 0)]


def test_train_can_be_called_again_in_one_process(tmp_path: Path, monkeypatch) -> None:
    # A submodule named like the function (vae_dist.train) once shadowed it after the first call.
    from vae_dist.training import trainer
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    save_model_file(tmp_path / "model.safetensors", build(cfg).state_dict(), cfg)
    monkeypatch.setattr(trainer, "train", lambda config, **_: tmp_path / "model.safetensors")
    assert [type(vae_dist.train(cfg)).__name__ for _ in range(2)] == ["TrainedVAE"] * 2


def test_a_checkpoint_claims_only_the_results_of_its_own_weights(tmp_path: Path) -> None:
    learner = _learner(tmp_path, epochs=2, checkpoint_every_steps=4)
    learner.fit()  # keeps step 16 (6 batches into epoch 2) and step 20 (its end)
    assert vae_dist.load(tmp_path / "checkpoints" / "step-000000016").results == {}  # not epoch 1's at step 10
    at_end = vae_dist.load(tmp_path / "checkpoints" / "step-000000020").results
    assert (at_end["step"], at_end["valid/loss"]) == (20, learner.position.history[-1]["valid/loss"])


ONE = torch.zeros(1, 784)
BAD_CALLS = {  # every entry point with input it cannot take; fn(model) makes the call
    "encode-empty": (lambda m: m.encode(torch.zeros(0, 784)), "at least one"),
    "reconstruct-empty": (lambda m: m.reconstruct(torch.zeros(0, 1, 28, 28, dtype=torch.uint8)), "at least one"),
    "iw_nll-empty": (lambda m: vae_dist.iw_nll(m, torch.zeros(0, 28, 28), k=5), "at least one"),
    "encode-nan": (lambda m: m.encode(torch.full((2, 784), float("nan"))), "finite"),
    "encode-784-as-4x196": (lambda m: m.encode(torch.zeros(2, 4, 196)), "shaped"),
    "interpolate-two-images-at-one-end": (lambda m: m.interpolate(torch.zeros(2, 784), ONE), "one image"),
    "decode-empty": (lambda m: m.decode(torch.zeros(0, 2)), "at least one"),
    "decode-int64": (lambda m: m.decode(torch.zeros(3, 2, dtype=torch.int64)), "floating point"),
    "decode-nan": (lambda m: m.decode(torch.tensor([[0.0, float("nan")]])), "finite"),
    "decode-wrong-size": (lambda m: m.decode(torch.zeros(3, 5)), "(N, 2)"),
    "sample-too-many": (lambda m: m.sample(MAX_IMAGES + 1), "n must be an integer from 1 to"),
    "sample-negative": (lambda m: m.sample(-1), "n must be"),
    "sample-float": (lambda m: m.sample(2.0), "n must be an integer"),
    "sample-bool": (lambda m: m.sample(True), "n must be an integer"),
    "sample-negative-seed": (lambda m: m.sample(2, seed=-1), "seed must be"),
    "sample-seed-over-64-bits": (lambda m: m.sample(2, seed=2**64), "seed must be"),
    "interpolate-too-many-steps": (lambda m: m.interpolate(ONE, ONE, steps=MAX_IMAGES + 1), "steps must be"),
    "interpolate-string-steps": (lambda m: m.interpolate(ONE, ONE, steps="5"), "steps must be"),
    "manifold-too-large": (lambda m: m.manifold(10**6), "n_per_side must be"),
    "manifold-0": (lambda m: m.manifold(0), "n_per_side must be"),
    "iw_nll-k-over-the-cli-bound": (lambda m: vae_dist.iw_nll(m, ONE, k=MAX_IW_SAMPLES + 1), "k must be"),
    "iw_nll-k-float": (lambda m: vae_dist.iw_nll(m, ONE, k=5.0), "k must be"),
    "iw_nll-not-a-model": (lambda m: vae_dist.iw_nll(m.model, ONE, k=5), "vae_dist.load"),
    "to-unknown-device": (lambda m: m.to("nodevice"), "cannot move the model"),
    "to-meta": (lambda m: m.to("meta"), "holds no weights"),
    "load-none": (lambda m: vae_dist.load(None), "model path None"),
    "load-unknown-user": (lambda m: vae_dist.load("~no-such-user-here/run"), "home directory"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_to_any_entry_point_is_one_line_and_the_model_stays_usable(tmp_path: Path, case) -> None:
    model = vae_dist.load(model_run(tmp_path))
    call, needle = BAD_CALLS[case]
    with pytest.raises(VaeDistError, match=re.escape(needle)) as e:
        call(model)
    assert "\n" not in str(e.value)
    assert model.sample(2, seed=MAX_GENERATOR_SEED).shape == (2, 1, 28, 28) and model.device.type == "cpu"


def test_latents_of_any_float_precision_decode_as_the_models_own(tmp_path: Path) -> None:
    model = vae_dist.load(model_run(tmp_path))
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    expected = model.decode(z)
    assert torch.equal(model.decode(z.double()), expected)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(model.decode(z.to(dtype)), model.decode(z.to(dtype).float()))


def test_a_path_in_an_error_stays_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(VaeDistError) as e:
        vae_dist.load(tmp_path / "two\nlines")
    assert "\n" not in str(e.value) and "two\\nlines" in str(e.value)


@pytest.mark.slow
def test_a_checkpoint_folder_loads_as_the_model_it_saved(finished_run: Path) -> None:
    final = vae_dist.load(finished_run)
    newest = max((finished_run / "checkpoints").glob("step-*"))
    from_checkpoint = vae_dist.load(newest)  # the last checkpoint is of the last step
    assert from_checkpoint.config == final.config
    assert from_checkpoint.results["valid/loss"] == final.results["valid/loss"]
    for (name, a), b in zip(final.model.state_dict().items(), from_checkpoint.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_readme_example_runs_as_written(finished_run: Path, tmp_path: Path, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    run = copy_run(finished_run, tmp_path)
    exec(compile(code.replace('"artifacts/vae-mnist"', repr(str(run))), "README.md", "exec"), {})
    kind_and_loss, shapes, nll = capsys.readouterr().out.splitlines()
    expected = vae_dist.load(run)
    assert kind_and_loss == f"{expected.config.model.kind} {round(expected.results['valid/loss'], 2)}"
    assert shapes == f"(16, 1, 28, 28) (16, {expected.latent_size})"
    assert 0 < float(nll) < 1000
