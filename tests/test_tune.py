"""`lookalike tune` on the 1,002 shared sample photos with the pretrained model: the model it writes, its card, the
embedding cache and the gate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from common.files import file_sha256
from common.images import decode_image, read_image_file
from common.model import load_model
from lookalike.stack import LOOKALIKE
from lookalike.tune_cli import held_out

LABELS = ("articleType", "baseColour", "gender")


def tune(data_dir: Path, shared_dir: Path, model: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    labels = [argument for label in LABELS for argument in ("--label", label)]
    return subprocess.run(
        [LOOKALIKE, "tune", "--model", model, "--catalog", shared_dir / "data" / "fashion", *labels,
         "--holdout", "0.2", "--out", out, *options],
        capture_output=True, text=True, env={"LOOKALIKE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, shared_dir, pretrained_model) -> tuple[Path, Path]:
    """One real tuning run (the cache's first): the data folder and the model it wrote."""
    data_dir = tmp_path_factory.mktemp("tune")
    out = data_dir / "tuned.onnx"
    result = tune(data_dir, shared_dir, pretrained_model, out, "--weight", "articleType=3", "--epochs", "10")
    assert result.returncode == 0, result.stderr
    assert "embedded 1,002 images and took 0 from the cache" in result.stderr
    return data_dir, out


def test_a_product_is_held_out_by_its_id_alone():
    ids = [str(number) for number in range(2000)]
    chosen = [item_id for item_id in ids if held_out(item_id, 0.1)]
    assert chosen == [item_id for item_id in ids if held_out(item_id, 0.1)]
    assert 150 < len(chosen) < 250
    assert set(chosen) <= {item_id for item_id in ids if held_out(item_id, 0.3)}


@pytest.mark.slow
def test_the_tuned_model_has_the_contract_and_gives_unit_vectors(tuned, pretrained_model, sample_images):
    _, out = tuned
    source, model = load_model(pretrained_model, ["cpu"]), load_model(out, ["cpu"])
    assert model.contract.input_name == source.contract.input_name
    assert model.contract.output_name == source.contract.output_name
    assert model.contract.size == source.contract.size and model.contract.dimension == 256
    paths = sorted(sample_images.glob("*.jpg"))[:6]
    images = np.stack([decode_image(read_image_file(path, 10**7), model.contract.size) for path in paths])
    vectors = model.embed(images)
    assert vectors.shape == (6, 256)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_the_card_names_the_source_labels_settings_and_held_out_quality(tuned, pretrained_model):
    _, out = tuned
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == file_sha256(out)
    assert card["source_model"] == {"file": pretrained_model.name, "sha256": file_sha256(pretrained_model)}
    assert card["labels"] == [{"label": "articleType", "weight": 3.0}, {"label": "baseColour", "weight": 1.0},
                              {"label": "gender", "weight": 1.0}]  # fmt: skip
    assert card["training"]["epochs"] == 10 and card["training"]["dim"] == 256
    assert card["head"] == {"kind": "mlp", "input": "unit backbone embedding", "output": "unit vector", "dim": 256,
                            "hidden": 1024}  # fmt: skip
    assert card["holdout"]["trained"] + card["holdout"]["held_out"] == 1002
    quality = card["quality"]["held_out_against_trained"]
    assert set(quality) == set(LABELS)
    for figures in quality.values():
        assert set(figures["before"]) == set(figures["after"]) == {"precision@1", "precision@5"}
        change = figures["after"]["precision@5"] - figures["before"]["precision@5"]
        assert figures["change@5"] == pytest.approx(change, abs=1e-4) and change >= -0.01  # the gate let it through
    assert card["parity"]["max_abs_difference"] <= card["parity"]["bound"]


@pytest.mark.slow
def test_a_model_that_loses_is_refused_unless_its_labels_are_allowed_to_and_nothing_is_embedded_twice(
    tuned, shared_dir, pretrained_model
):
    data_dir, _ = tuned
    out = data_dir / "collapsed.onnx"
    # one dimension, one epoch: a head that can't keep the neighbours apart
    refused = tune(data_dir, shared_dir, pretrained_model, out, "--head", "linear", "--dim", "1", "--epochs", "1")
    assert refused.returncode == 1
    assert "embedded 0 images and took 1,002 from the cache" in refused.stderr
    assert "articleType: held-out precision@5 " in refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("lookalike tune: error: ") and "articleType loses " in error
    assert "no model written (add --allow-loss LABEL" in error
    assert not out.exists() and not out.with_suffix(".json").exists()

    allowed = [argument for label in LABELS for argument in ("--allow-loss", label)]
    written = tune(
        data_dir, shared_dir, pretrained_model, out, "--head", "linear", "--dim", "1", "--epochs", "1", *allowed
    )
    assert written.returncode == 0, written.stderr
    assert "embedded 0 images" in written.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["quality"]["allowed_loss"] == list(LABELS)
    assert card["head"]["kind"] == card["training"]["head"] == "linear" and "hidden" not in card["head"]
    assert card["quality"]["held_out_against_trained"]["articleType"]["change@5"] < -0.01
    assert load_model(out, ["cpu"]).contract.dimension == 1


def test_a_weight_for_a_label_that_is_not_tuned_is_refused_in_one_line(tmp_path, shared_dir, pretrained_model):
    result = tune(tmp_path, shared_dir, pretrained_model, tmp_path / "out.onnx", "--weight", "usage=2")
    assert result.returncode == 1
    assert result.stderr.strip() == "lookalike tune: error: --weight usage=2: 'usage' is not a --label of this run"


def test_an_mlp_head_without_hidden_units_is_refused_in_one_line(tmp_path, shared_dir, pretrained_model):
    result = tune(tmp_path, shared_dir, pretrained_model, tmp_path / "out.onnx", "--head", "mlp", "--hidden", "0")
    assert result.returncode == 1
    assert result.stderr.strip() == "lookalike tune: error: --hidden 0: give a number of units, such as 1024"


@pytest.mark.slow
def test_an_int8_model_is_tuned_with_an_mlp_head_too(tuned, shared_dir, pretrained_model, sample_images):
    """Its graph declares other versions of the domains tf2onnx declares for the head (ai.onnx.ml 5 against 2)."""
    data_dir, _ = tuned
    int8 = data_dir / "int8.onnx"
    quantised = subprocess.run([LOOKALIKE, "export", "--quantize", "int8", "--model", pretrained_model, "--calibration",
                                sample_images, "--calibration-images", "16", "--out", int8], capture_output=True,
                               text=True)  # fmt: skip
    assert quantised.returncode == 0, quantised.stderr
    out = data_dir / "int8_tuned.onnx"
    allowed = [argument for label in LABELS for argument in ("--allow-loss", label)]
    result = tune(data_dir, shared_dir, int8, out, "--head", "mlp", "--hidden", "64", "--epochs", "1", *allowed)
    assert result.returncode == 0, result.stderr
    assert "256-dimension mlp head" in result.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["source_model"]["sha256"] == file_sha256(int8)
    assert card["head"]["kind"] == "mlp" and card["head"]["hidden"] == 64 and card["training"]["hidden"] == 64
    assert card["parity"]["max_abs_difference"] <= card["parity"]["bound"]
    assert load_model(out, ["cpu"]).contract.dimension == 256
