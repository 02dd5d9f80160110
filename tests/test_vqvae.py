"""The VQ-VAE family (models/vqvae.py): its objective and straight-through gradient, its
prior fitted on the training set, and the family end to end through the CLI, evaluate, the
pictures, the API and the trackers, by the protocol alone."""

from __future__ import annotations

import json

import pytest
import torch

import vae_dist
from conftest import check_ok, main_in_process, one_error_line, small_train_args
from vae_dist.config import TrainingConfig
from vae_dist.errors import VaeDistError
from vae_dist.models import build


def _model(codes: int = 16, image_shape=(1, 28, 28)):
    torch.manual_seed(0)
    return build(TrainingConfig.from_dict({"model": {"kind": "vq-vae", "latent_size": 4, "image_shape": image_shape,
                                                     "vq_vae": {"codebook_size": codes, "channels": [4, 8],
                                                                "commitment": 0.5}}}))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _moved(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_the_objective_and_its_straight_through_gradient():
    model, x = _model(), _images(5)
    terms = model(x, None).terms
    assert torch.allclose(terms["loss"], terms["recon"] + terms["codebook"] + 0.5 * terms["commitment"])
    encoder, decoder, codebook = model.encoder[0].weight, model.decoder[0].weight, model.codebook.weight
    # The reconstruction reaches the encoder through the quantisation, but not the codebook;
    # the codebook term moves only the codebook, the commitment term only the encoder.
    for term, moves in (("recon", (encoder, decoder)), ("codebook", (codebook,)), ("commitment", (encoder,))):
        model.zero_grad(set_to_none=True)
        model(x, None).terms[term].sum().backward()
        assert [_moved(p) for p in (encoder, decoder, codebook)] == [any(p is m for m in moves) for p in (encoder, decoder, codebook)]


def test_the_prior_is_fitted_on_the_training_codes_and_sampled_by_seed():
    model, x = _model(codes=8), _images(40, seed=1)
    model.fit_prior(x.split(16))
    codes = model(x, None).features  # (40, 49)
    counts = torch.nn.functional.one_hot(codes, 8).sum(dim=0)
    assert torch.equal(model.prior_counts, counts.float() + 1)
    a, b = model.sample(6, torch.Generator().manual_seed(3)), model.sample(6, torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 28, 28) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    used = model.summarise(codes)
    assert used["codes_used"] == int((counts.sum(dim=0) > 0).sum()) and 1 <= used["perplexity"] <= 8


def test_the_grid_of_codes_is_a_quarter_of_the_image_and_the_decoder_gives_its_channels():
    model, x = _model(codes=8, image_shape=(3, 32, 16)), torch.rand(3, 3, 32, 16)
    model.fit_prior([x])
    assert model(x, None).features.shape == (3, 8 * 4) and model.prior_counts.shape == (8 * 4, 8)
    assert model.reconstruct(x).shape == x.shape and model.sample(2, torch.Generator()).shape == (2, 3, 32, 16)
    with pytest.raises(VaeDistError, match=r"^--model vq-vae takes images whose sides are multiples of 4 .* 1x30x28$"):
        _model(image_shape=(1, 30, 28))


@pytest.mark.slow
def test_vq_vae_end_to_end_by_the_protocol(data_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    art = tmp_path / "run"
    refused = main_in_process(small_train_args(data_dir, art, "--model", "vq-vae", "--iw-train-samples", "5"), capsys)
    assert "importance-weighted" in one_error_line(refused) and not art.exists()

    ran = main_in_process(small_train_args(data_dir, art, "--model", "vq-vae", "--report-to", "tensorboard"), capsys)
    check_ok(ran)
    assert "train/commitment" in ran.stdout and "valid/codes_used" in ran.stdout  # the summary: terms, codebook use
    config = json.loads((art / "config.json").read_text())
    assert config["model"]["kind"] == "vq-vae" and config["model"]["vq_vae"]["codebook_size"] == 128
    row = json.loads((art / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train/codebook", "train/commitment", "valid/recon", "valid/codes_used", "valid/perplexity"):
        assert key in row
    assert 1 <= row["valid/codes_used"] <= 128
    events = EventAccumulator(str(art / "tensorboard"))
    events.Reload()
    assert {"valid/codes_used", "valid/perplexity", "train/commitment"} <= set(events.Tags()["scalars"])

    evaluated = main_in_process(["evaluate", str(art), "--json"], capsys)
    check_ok(evaluated)
    result = json.loads(evaluated.stdout)
    assert result["loss"] == pytest.approx(row["valid/loss"]) and result["codes_used"] == row["valid/codes_used"]
    assert "importance-weighted" in one_error_line(main_in_process(["evaluate", str(art), "--iw-samples", "10"], capsys))
    check_ok(main_in_process(["sample", str(art), "--num", "4"], capsys))
    assert (art / "samples.png").stat().st_size > 0
    assert "latent space" in one_error_line(main_in_process(["interpolate", str(art), "--from", "0", "--to", "1"], capsys))

    model = vae_dist.load(art)
    assert model.sample(4, seed=1).shape == (4, 1, 28, 28) and model.reconstruct(_images(2)).shape == (2, 1, 28, 28)
    with pytest.raises(VaeDistError, match="no continuous latent space"):
        model.encode(_images(2))
