"""`lookalike export` as a user runs it: progress with timings, and every usage error as one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from export.images import list_images
from tests.conftest import int8_min_cosine

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


def lookalike(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LOOKALIKE, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str, code: int = 1) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if "lookalike" in line and "error" in line]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_the_export_command_and_its_examples():
    assert "export" in lookalike("--help").stdout
    usage = lookalike("export", "--help")
    assert usage.returncode == 0
    assert "--quantize int8 --model SRC.onnx --calibration DIR --out DST.onnx" in usage.stdout


def test_unknown_pooling(tmp_path):
    assert_one_line_error(lookalike("export", "--pooling", "median"), "invalid choice: 'median'", code=2)


def test_missing_weights_file(tmp_path):
    result = lookalike("export", "--weights", tmp_path / "resnet50_notop.h5", "--out", tmp_path / "m.onnx")
    assert_one_line_error(result, f"weights file {tmp_path / 'resnet50_notop.h5'} does not exist")


def test_truncated_weights_file(tmp_path):
    weights = tmp_path / "resnet50_notop.h5"
    with h5py.File(weights, "w") as file:
        file["kernel"] = np.zeros(10_000)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = lookalike("export", "--weights", weights, "--out", tmp_path / "m.onnx")
    assert_one_line_error(result, "is truncated")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = lookalike("export", "--weights", "none", "--out", blocker / "models" / "m.onnx")
    assert_one_line_error(result, f"can't write to {blocker / 'models'}")


def test_no_calibration_images(tmp_path, pretrained_model):
    (tmp_path / "empty").mkdir()
    result = lookalike("export", "--quantize", "int8", "--model", pretrained_model, "--calibration", tmp_path / "empty")
    assert_one_line_error(result, f"no images in {tmp_path / 'empty'}")
    assert_one_line_error(lookalike("export", "--quantize", "int8"), "needs --calibration DIR")
    assert_one_line_error(lookalike("export", "--model", pretrained_model), "add --quantize int8")


def test_quantising_any_contract_model_from_the_command_line(tmp_path, pretrained_model, sample_images):
    out = tmp_path / "efficientnet_int8.onnx"
    result = lookalike(
        "export", "--quantize", "int8", "--model", pretrained_model, "--calibration", sample_images,
        "--calibration-images", "64", "--holdout-images", "32", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["quantization"]["calibration_images"] == 64
    assert card["quantization"]["mean_cosine_fp32_int8"] >= int8_min_cosine()
    assert "quantise: done in" in result.stderr


@pytest.mark.slow
def test_export_then_quantise_in_one_command(tmp_path, sample_images):
    calibration = tmp_path / "catalog"
    calibration.mkdir()
    for path in list_images(sample_images)[:15]:
        shutil.copy(path, calibration)
    result = lookalike("export", "--weights", "none", "--quantize", "int8", "--calibration", calibration, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for step in ("build Keras model", "convert to ONNX with tf2onnx", "parity check, Keras vs onnxruntime", "quantise"):
        assert f"{step}: done in" in result.stderr
    fp32, int8 = tmp_path / "models" / "resnet50_max.onnx", tmp_path / "models" / "resnet50_max_int8.onnx"
    int8_card = json.loads(int8.with_suffix(".json").read_text())
    fp32_card = json.loads(fp32.with_suffix(".json").read_text())
    assert int8_card["source_model"] == {"file": fp32.name, "sha256": fp32_card["sha256"]}
    assert (int8_card["backbone"], int8_card["pooling"], int8_card["precision"]) == ("ResNet50", "max", "int8")
