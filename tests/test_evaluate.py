"""`lookalike evaluate`: the metrics on hand-made cases, and the command on the shared photos and model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest

from lookalike.stack import LOOKALIKE
from worker.evaluation.metrics import exact_neighbours, label_quality
from worker.evaluation.run import Embeddings, evaluate
from worker.index import IndexParams


def unit(rows: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_exact_neighbours_rank_by_cosine_and_leave_the_query_out():
    vectors = unit([[1, 0], [0.9, 0.1], [0, 1], [0.5, 0.5]])
    assert exact_neighbours(vectors, vectors, 2, leave_one_out=True).tolist() == [[1, 3], [0, 3], [3, 1], [1, 0]]
    assert exact_neighbours(vectors[:1], vectors, 2, leave_one_out=False).tolist() == [[0, 1]]


def test_neighbours_are_products_as_similar_as_their_most_similar_photos_and_a_product_never_finds_itself():
    # a jacket photographed from the front and the back; a shirt like its front, a coat like its back, a hat
    vectors = unit([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0.1, 0.9, 0.1], [0, 0, 1]])
    ids = ["jacket", "jacket", "shirt", "coat", "hat"]
    kinds = [{"kind": "top"}] * 4 + [{"kind": "hat"}]
    catalogue = Embeddings(ids, vectors, kinds)
    assert catalogue.products == ["jacket", "shirt", "coat", "hat"] and catalogue.starts.tolist() == [0, 2, 3, 4]
    exact = exact_neighbours(vectors, vectors, 2, True, catalogue.starts, catalogue.starts)
    # positions of products; the jacket is found by each of its photos; the hat is nearest the coat, no other hat
    assert exact[:3].tolist() == [[1, 2], [0, 2], [0, 1]] and exact[3, 0] == 2
    result = evaluate(catalogue, ["kind"], index_params=[IndexParams(dim=3, m=4, ef_construction=20, ef=10)])
    assert result.items == 4 and result.ann[1]["recall@10"] == 1.0
    assert result.labels[0].queries == 3 and result.labels[0].precision[1] == 1.0  # the hat has no other hat


def test_precision_and_map_follow_their_definitions():
    # query 0 (a): neighbours a, b, a -> right at ranks 1 and 3; two other a's in the catalogue
    # query 1 (b): neighbours a, b, b -> right at ranks 2 and 3; two other b's
    catalogue = ["a", "b", "a", "a", "b", "b"]
    neighbours = np.array([[2, 1, 3], [0, 4, 5]])
    quality = label_quality("kind", ["a", "b"], catalogue, neighbours, leave_one_out=True)
    assert quality.precision[1] == pytest.approx(0.5)
    assert quality.map_at_10 == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert quality.queries == 2 and quality.skipped == 0


def test_a_query_whose_label_no_other_item_has_is_not_counted():
    quality = label_quality("kind", ["a", None, "z"], ["a", "a", "z"], np.array([[1], [0], [0]]), leave_one_out=True)
    assert quality.queries == 1 and quality.skipped == 2 and quality.precision[1] == 1.0


def test_the_index_agrees_with_exact_search_on_clustered_vectors():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(20, 16))
    vectors = unit((centres[np.arange(400) % 20] + 0.3 * rng.normal(size=(400, 16))).tolist())
    ids = [str(number) for number in range(400)]
    embeddings = Embeddings(ids, vectors, [{"cluster": str(number % 20)} for number in range(400)])
    result = evaluate(embeddings, ["cluster"], index_params=[IndexParams(16, ef=64)])
    assert result.labels[0].precision[10] > 0.95
    assert result.ann[0]["index"] == "exact (numpy)" and result.ann[1]["recall@10"] > 0.95


@pytest.mark.slow
def test_the_command_compares_models_on_the_shared_photos(tmp_path, pretrained_model, shared_dir):
    """fp32 against its INT8 copy, leave-one-out over the 1,002 sample photos, articleType and subCategory."""
    int8 = tmp_path / "int8.onnx"
    images = shared_dir / "data" / "fashion" / "images"
    quantised = subprocess.run([LOOKALIKE, "export", "--quantize", "int8", "--model", pretrained_model,
                                "--calibration", images, "--out", int8], capture_output=True, text=True)  # fmt: skip
    assert quantised.returncode == 0, quantised.stderr
    report = tmp_path / "quality.json"
    result = subprocess.run(
        [LOOKALIKE, "evaluate", "--model", pretrained_model, "--model", int8, "--catalog", shared_dir / "data" /
         "fashion", "--label", "articleType", "--label", "subCategory", "--ef", "16", "--ef", "128", "--json", report],
        capture_output=True, text=True, env={"LOOKALIKE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| setting | label | queries | P@1 | P@5 | P@10 | mAP@10 |" in result.stdout
    fp32, quantized = json.loads(report.read_text())
    article = {model["setting"]["model"]: model["labels"][0] for model in (fp32, quantized)}
    assert fp32["items"] == 1002 and fp32["labels"][0]["queries"] == 1002
    assert article[pretrained_model.name]["precision@5"] > 0.45  # real features: far above chance (~0.05)
    assert abs(article["int8.onnx"]["precision@5"] - article[pretrained_model.name]["precision@5"]) <= 0.01
    assert fp32["ann"][2]["recall@10"] >= 0.99 and len(fp32["labels"][0]["worst"]) == 10


@pytest.mark.slow
def test_the_command_counts_products_of_several_photos_once(tmp_path, pretrained_model, shared_dir):
    """A catalogue of two photos per product (rows that share an id): each product is one query and one neighbour,
    searched with both its photos, and never its own neighbour."""
    sample = shared_dir / "data" / "fashion"
    by_kind: dict[str, list[str]] = {}
    with (sample / "styles.csv").open(newline="") as styles:
        for row in csv.DictReader(styles):
            if (sample / "images" / f"{row['id']}.jpg").is_file():
                by_kind.setdefault(row["articleType"], []).append(row["id"])
    shop = tmp_path / "uploads" / "shop"
    shop.mkdir(parents=True)
    rows = ["id,image,articleType"]
    for kind in ("Tshirts", "Watches", "Casual Shoes", "Handbags"):
        photos = by_kind[kind][:12]
        for number in range(0, len(photos), 2):
            for photo in photos[number : number + 2]:
                shutil.copy(shared_dir / "data" / "fashion" / "images" / f"{photo}.jpg", shop / f"{photo}.jpg")
                rows.append(f"{kind}-{number},{photo}.jpg,{kind}")
    (shop / "products.csv").write_text("\n".join(rows) + "\n")
    report = tmp_path / "quality.json"
    result = subprocess.run(
        [LOOKALIKE, "evaluate", "--model", pretrained_model, "--catalog", shop / "products.csv", "--label",
         "articleType", "--json", report],
        capture_output=True, text=True, env={"LOOKALIKE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (evaluation,) = json.loads(report.read_text())
    assert evaluation["items"] == 24 and evaluation["labels"][0]["queries"] == 24
    assert evaluation["labels"][0]["precision@1"] > 0.8 and evaluation["ann"][1]["recall@10"] == 1.0
