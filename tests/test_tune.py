"""`lookalike tune` on the 1,002 shared sample photos with the pretrained model: the model it writes, its card, the
embedding cache and the gate."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from common.files import file_sha256
from common.images import decode_image, read_image_file
from common.model import load_model
from lookalike.stack import LOOKALIKE
from lookalike.tune_cli import held_out

LABELS = ("articleType", "baseColour", "gender")


def tune(
    data_dir: Path,
    shared_dir: Path,
    model: Path,
    out: Path,
    *options: str,
    catalog: Path | None = None,
    labels: Sequence[str] = LABELS,
) -> subprocess.CompletedProcess:
    """`lookalike tune` on the shared sample (or `catalog`) with `labels`."""
    arguments = [argument for label in labels for argument in ("--label", label)]
    return subprocess.run(
        [LOOKALIKE, "tune", "--model", model, "--catalog", catalog or shared_dir / "data" / "fashion", *arguments,
         "--holdout", "0.2", "--out", out, *options],
        capture_output=True, text=True, env={"LOOKALIKE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def sample_csv(path: Path, shared_dir: Path, rows: int, **only: str) -> Path:
    """A catalogue CSV at `path` of the first `rows` sample photos whose columns have the values `only` gives."""
    fashion = shared_dir / "data" / "fashion"
    with (fashion / "styles.csv").open(newline="") as file:
        chosen = [
            {**row, "image": str(fashion / "images" / f"{row['id']}.jpg")}
            for row in csv.DictReader(file)
            if (fashion / "images" / f"{row['id']}.jpg").is_file() and all(row[k] == v for k, v in only.items())
        ][:rows]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return path


def assert_refused_before_writing(result: subprocess.CompletedProcess, out: Path, error: str) -> None:
    """Exit 2, the one line, and no model, card or head."""
    assert (result.returncode, result.stderr) == (2, f"lookalike tune: error: {error}\n")
    assert not [path for path in out.parent.iterdir() if path.name.startswith(out.stem)]


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


def test_a_label_no_item_has_is_refused_naming_the_columns_before_any_work(tmp_path, shared_dir, pretrained_model):
    catalogue = sample_csv(tmp_path / "catalogue.csv", shared_dir, 6)
    out = tmp_path / "tuned.onnx"
    result = tune(tmp_path, shared_dir, pretrained_model, out, "--weight", "colour=2", catalog=catalogue,
                  labels=["masterCategory", "colour"])  # fmt: skip
    columns = "gender, masterCategory, subCategory, articleType, baseColour, season, year, usage, ..."
    assert_refused_before_writing(result, out, f"label 'colour' is in no item of the catalogue: name one of its "
                                  f"columns ({columns})")  # fmt: skip
    assert not (tmp_path / "cache").exists()  # nothing embedded


def test_a_label_with_a_single_value_is_refused_before_any_work(tmp_path, shared_dir, pretrained_model):
    catalogue = sample_csv(tmp_path / "men.csv", shared_dir, 6, gender="Men")
    out = tmp_path / "tuned.onnx"
    result = tune(tmp_path, shared_dir, pretrained_model, out, catalog=catalogue, labels=["masterCategory", "gender"])
    assert_refused_before_writing(result, out, "label 'gender' has a single value ('Men') among the catalogue's 6 "
                                  "items: tuning needs at least two values with 2 items each")  # fmt: skip


def test_a_label_whose_values_are_each_on_one_item_is_refused(tmp_path, shared_dir, pretrained_model):
    catalogue = sample_csv(tmp_path / "catalogue.csv", shared_dir, 6)
    out = tmp_path / "tuned.onnx"
    result = tune(tmp_path, shared_dir, pretrained_model, out, catalog=catalogue, labels=["productDisplayName"])
    assert_refused_before_writing(result, out, "label 'productDisplayName' has 6 values, 0 of them on 2 items or "
                                  "more, among the catalogue's 6 items: tuning needs at least two values with 2 items "
                                  "each")  # fmt: skip


def test_weights_that_are_all_zero_are_refused_as_nothing_would_be_learnt(tmp_path, shared_dir, pretrained_model):
    out = tmp_path / "tuned.onnx"
    result = tune(tmp_path, shared_dir, pretrained_model, out, "--weight", "articleType=0", labels=["articleType"])
    assert_refused_before_writing(result, out, "--weight articleType=0: every label weighs 0, so nothing would be "
                                  "learnt; give one a weight above 0")  # fmt: skip


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
