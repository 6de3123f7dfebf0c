"""A local weights file is checked before Keras reads it: it exists, it is HDF5, it is whole."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from common.files import file_sha256
from export.errors import ExportError
from export.weights import check_weights_file, hdf5_end_of_file, resolve_weights


def _hdf5_file(path: Path, **options) -> Path:
    with h5py.File(path, "w", **options) as file:
        file["kernel"] = np.arange(4096, dtype=np.float32)
    return path


@pytest.mark.parametrize(
    "options", [{}, {"libver": "latest"}, {"userblock_size": 512}], ids=["v0", "v2-superblock", "user-block"]
)
def test_the_end_of_file_field_matches_a_whole_file(tmp_path, options):
    path = _hdf5_file(tmp_path / "w.weights.h5", **options)
    assert hdf5_end_of_file(path) == path.stat().st_size
    check_weights_file(path)


def test_a_local_file_is_recorded_with_its_sha256(tmp_path):
    path = _hdf5_file(tmp_path / "w.weights.h5")
    source = resolve_weights(str(path))
    assert (source.kind, source.path, source.sha256) == ("file", path, file_sha256(path))


def test_a_truncated_file_is_refused(tmp_path):
    path = _hdf5_file(tmp_path / "resnet50_notop.h5")
    whole = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(whole - 1000)
    with pytest.raises(ExportError, match=f"is truncated: {whole - 1000:,} bytes on disk, its HDF5 header says"):
        resolve_weights(str(path))


def test_missing_misnamed_and_non_hdf5_files_are_refused(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.h5"))
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    with pytest.raises(ExportError, match="is not an HDF5 file"):
        resolve_weights(str(text))
    other = _hdf5_file(tmp_path / "weights.bin")
    with pytest.raises(ExportError, match=r"not a Keras weights file \(expected \*_notop.h5 or \*.weights.h5\)"):
        resolve_weights(str(other))


def test_imagenet_weights_are_keras_download_checked_like_a_local_file(tmp_path, monkeypatch):
    import keras

    cached = _hdf5_file(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    requested = {}

    def fake_get_file(fname, origin, **options):
        requested.update(fname=fname, origin=origin, **options)
        return str(cached)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    source = resolve_weights("imagenet")
    assert (source.kind, source.sha256) == ("imagenet", file_sha256(cached))
    assert requested["origin"].endswith("/keras-applications/resnet/" + requested["fname"])
    assert requested["file_hash"] == "4d473c1dd8becc155b73f8504c6f6626"


def test_a_failed_imagenet_download_says_how_to_pass_a_file(monkeypatch):
    import keras

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", unreachable)
    with pytest.raises(ExportError, match=r"can't download the ImageNet weights \(Network is unreachable\).*--weights"):
        resolve_weights("imagenet")
