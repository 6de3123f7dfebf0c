"""`lookalike export --from`: a model the shop already has, from a path or a URL, as a deployment's export service
takes it when it can't (or needn't) download Keras's weights."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from onnx import TensorProto

from common.files import file_sha256
from lookalike.cli import main
from tests.onnx_models import pooling_model


@contextmanager
def serving(folder: Path) -> Iterator[str]:
    """A plain HTTP server on loopback that serves `folder`, as a shop's file server would."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_file_with_the_contract_is_checked_and_copied_with_its_card(tmp_path):
    (tmp_path / "shop").mkdir()
    source = pooling_model(tmp_path / "shop" / "ours.onnx")
    (tmp_path / "shop" / "ours.json").write_text('{"name": "ours"}')
    out = tmp_path / "models" / "model.onnx"
    assert main(["export", "--from", str(source), "--out", str(out)]) == 0
    assert file_sha256(out) == file_sha256(source)
    assert (tmp_path / "models" / "model.json").read_text() == '{"name": "ours"}'


def test_a_model_at_a_url_is_downloaded_checked_and_copied_leaving_no_download_behind(tmp_path, pretrained_model):
    out = tmp_path / "models" / "model.onnx"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.json").write_text('{"name": "the model that was here before"}')
    with serving(pretrained_model.parent) as url:  # the server has no card for it: a 404 is no error
        assert main(["export", "--from", f"{url}/{pretrained_model.name}", "--out", str(out)]) == 0
    assert file_sha256(out) == file_sha256(pretrained_model)
    assert sorted(path.name for path in out.parent.iterdir()) == ["model.onnx"]  # nor another model's card


def test_a_model_at_a_url_comes_with_its_card_when_the_server_has_one(tmp_path):
    (tmp_path / "shop").mkdir()
    pooling_model(tmp_path / "shop" / "ours.onnx")
    (tmp_path / "shop" / "ours.json").write_text('{"name": "ours"}')
    out = tmp_path / "models" / "model.onnx"
    with serving(tmp_path / "shop") as url:
        assert main(["export", "--from", f"{url}/ours.onnx", "--out", str(out)]) == 0
    assert (tmp_path / "models" / "model.json").read_text() == '{"name": "ours"}'


def test_if_missing_keeps_the_model_that_is_there(tmp_path, capsys):
    out = pooling_model(tmp_path / "model.onnx")
    before = out.stat().st_mtime_ns
    assert main(["export", "--from", "/nowhere/model.onnx", "--out", str(out), "--if-missing"]) == 0
    assert out.stat().st_mtime_ns == before and "there already" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make_source", "reason"),
    [
        (lambda folder: str(pooling_model(folder / "bad.onnx", input_type=TensorProto.FLOAT)), "uint8"),
        (lambda folder: str(folder / "missing.onnx"), "no such file"),
        (lambda folder: "http://127.0.0.1:9/model.onnx", "can't download"),
    ],
    ids=["breaks-the-contract", "missing", "unreachable"],
)
def test_a_source_that_is_not_a_usable_model_is_refused_in_one_line_and_writes_nothing(
    tmp_path, capsys, make_source, reason
):
    out = tmp_path / "models" / "model.onnx"
    assert main(["export", "--from", make_source(tmp_path), "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert reason in error.lower() and "\n" not in error, error
    assert not out.exists() and not any(out.parent.glob(".*"))


@pytest.mark.parametrize("other", [["--weights", "none"], ["--model", "m.onnx", "--quantize", "int8",
                                                            "--calibration", "."]])  # fmt: skip
def test_from_is_refused_beside_weights_or_quantize(tmp_path, capsys, other):
    assert main(["export", "--from", "imagenet", *other, "--out", str(tmp_path / "model.onnx")]) == 1
    assert "--from" in capsys.readouterr().err


def test_if_missing_looks_at_the_file_a_quantisation_would_write(tmp_path, capsys):
    source = pooling_model(tmp_path / "ours.onnx")
    int8 = pooling_model(tmp_path / "ours_int8.onnx")
    before = int8.stat().st_mtime_ns
    argv = ["export", "--quantize", "int8", "--model", str(source), "--calibration", str(tmp_path), "--if-missing"]
    assert main(argv) == 0
    assert int8.stat().st_mtime_ns == before and "ours_int8.onnx is there already" in capsys.readouterr().out
