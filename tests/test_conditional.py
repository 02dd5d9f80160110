"""The conditional VAE (--conditional, Sohn et al. 2015): the class label reaches the encoder and
the decoder, sampling by class (the API's label, the CLI's --label, one row per class without
one), and the one-line refusals: a family without a conditional form, a dataset without labels,
a label the model does not know."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vae_dist
from conftest import check_ok, main_in_process, one_error_line, small_train_args
from test_datasets import write_npy_dataset
from vae_dist.config import TrainingConfig
from vae_dist.errors import ConfigError, DataError
from vae_dist.evaluation.api import TrainedVAE
from vae_dist.evaluation import evaluate
from vae_dist.models import build


def _config(kind: str = "mlp", classes: int = 10, **model) -> TrainingConfig:
    return TrainingConfig.from_dict({"model": {"kind": kind, "latent_size": 3, "hidden_sizes": [16],
                                               "conv_channels": [4, 8], "conditional": True, "num_classes": classes,
                                               **model}})


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_label_reaches_the_encoder_and_the_decoder(kind):
    torch.manual_seed(0)
    model = build(_config(kind))
    x, z, eps = torch.rand(4, 1, 28, 28), torch.randn(4, 3), torch.randn(4, 3)
    sevens, ones = torch.full((4,), 7), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(model.decode(z, sevens), model.decode(z, ones))
    assert not torch.allclose(model.encode(x, sevens)[0], model.encode(x, ones)[0])
    assert not torch.allclose(model(x, eps, labels=sevens).terms["loss"], model(x, eps, labels=ones).terms["loss"])
    # The importance-weighted bound and estimate decode each image's samples with its own label.
    by_image = model(x, eps.unsqueeze(1), labels=torch.tensor([7, 1, 7, 1])).terms["loss"]
    assert torch.allclose(by_image[::2], model(x, eps.unsqueeze(1), labels=sevens).terms["loss"][::2])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    assert torch.allclose(model.iw_nll(x, 3, gens(), torch.tensor([7, 1, 7, 1]))[1::2],
                          model.iw_nll(x, 3, gens(), ones)[1::2])


def test_sampling_by_class_decodes_the_same_latents_with_the_class(tmp_path):
    torch.manual_seed(0)
    config = _config()
    model = TrainedVAE(build(config), config, {})
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(5))  # what sample(20, seed=5) draws
    assert torch.allclose(model.sample(20, seed=5, label=7), model.decode(z, 7))
    # Without a label: each class in turn, 2 each, so a grid 2 wide has one row per class.
    assert torch.allclose(model.sample(20, seed=5), model.decode(z, torch.arange(20) // 2))
    for bad in (10, -1):
        with pytest.raises(DataError, match=r"^this model is conditional: .* each 0 to 9; got " + str(bad)):
            model.sample(4, label=bad)
    with pytest.raises(DataError, match="^this model is conditional"):
        model.reconstruct(torch.rand(2, 784))  # no labels
    plain = TrainedVAE(build(TrainingConfig()), TrainingConfig(), {})
    with pytest.raises(DataError, match="^this model is not conditional"):
        plain.sample(4, label=3)


def test_a_family_without_a_conditional_form_refuses_it(tmp_path, capsys):
    art = tmp_path / "run"
    line = one_error_line(main_in_process(["train", "--model", "vq-vae", "--conditional", "--artifact-dir", str(art)],
                                          capsys))
    assert line == "error: model: --model vq-vae has no conditional form: drop --conditional" and not art.exists()


def test_a_dataset_without_labels_refuses_conditional_before_writing_anything(tmp_path, capsys):
    data, art = write_npy_dataset(tmp_path / "data", shape=(1, 8, 8), train=8, test=4, labels=False), tmp_path / "run"
    ran = main_in_process(small_train_args(data, art, "--dataset", "npy", "--conditional", "--batch-size", "4"), capsys)
    assert one_error_line(ran) == (f"error: --conditional needs class labels, and the npy training images in {data} "
                                   "have none (npy: add train_labels.npy and test_labels.npy)") and not art.exists()


def test_the_test_labels_must_be_classes_the_model_knows(tmp_path):
    data = write_npy_dataset(tmp_path, shape=(1, 8, 8), train=1, test=12)  # test labels 0..9
    config = _config(classes=9, image_shape=[1, 8, 8])
    config = TrainingConfig.from_dict({**config.to_dict(), "data": {"dataset": "npy", "data_dir": str(data)}})
    with pytest.raises(DataError, match=f"^the npy test images in {data} have label 9; the conditional model takes "
                                        "classes 0 to 8$"):
        evaluate.test_split(config)
    np.save(data / "test_labels.npy", np.arange(12) % 9)
    assert evaluate.test_split(config, limit=5).labels.tolist() == [0, 1, 2, 3, 4]


def test_build_refuses_a_conditional_model_without_its_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        build(_config(classes=None))


@pytest.mark.slow  # trains 3 steps and runs the commands on the result
def test_a_conditional_run_trains_and_samples_by_class(tmp_path, capsys):
    data, art = write_npy_dataset(tmp_path / "data", shape=(1, 8, 8)), tmp_path / "run"
    args = small_train_args(data, art, "--dataset", "npy", "--conditional", "--model", "conv", "--conv-channels", "4,8",
                            "--latent-size", "3", "--batch-size", "16", "--max-steps", "3", "--iw-train-samples", "2")
    check_ok(main_in_process(args, capsys))
    model_config = json.loads((art / "config.json").read_text())["model"]
    assert model_config["conditional"] is True and model_config["num_classes"] == 10
    with Image.open(art / "images" / "epoch-001-samples.png") as img:
        assert img.size == (8 * 10 + 2, 10 * 10 + 2)  # 10 rows (a class each) of 8 tiles of 8 + 2 padding
    ran = main_in_process(["evaluate", str(art), "--json", "--iw-samples", "3"], capsys)
    check_ok(ran)
    result = json.loads(ran.stdout)
    assert result["samples"] == 32 and "-log p(x | class)" in result["protocol"]["conditional"]
    model = vae_dist.load(art)
    check_ok(main_in_process(["sample", str(art), "--num", "4", "--label", "7", "--out", str(tmp_path / "7.png")],
                             capsys))
    with Image.open(tmp_path / "7.png") as img:
        tiles = np.asarray(img)[2:10, [2 + i * 10 + j for i in range(2) for j in range(8)]]
    sevens = model.sample(4, seed=0, label=7)  # --seed 0, in a 2 x 2 grid
    expected = (sevens[:2, 0].permute(1, 0, 2).reshape(8, 16) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(tiles, expected)
    for command in (["reconstruct", str(art), "--num", "4"], ["interpolate", str(art), "--from", "0", "--to", "1"]):
        check_ok(main_in_process(command, capsys))
    line = one_error_line(main_in_process(["sample", str(art), "--label", "10"], capsys))
    assert line == "error: this model is conditional: its labels are one class for all, or one per image (64), " \
                   "each 0 to 9; got 10"
