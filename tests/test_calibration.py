"""Calibration ("no close match"): the fit on synthetic neighbours whose answer is known, and end to end with real
processes: a calibration stored with the serving index gives every hit a confidence, says when nothing close was
found (the page too), survives an owner restart, is used by the replica, and is refused when fitted for other
vectors."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UsageError
from lookalike.stack import LOOKALIKE
from protocol.client import ReadError
from protocol.heartbeats import Role
from protocol.queues import Task
from tests.test_index_switch import another_model, owner_beat, switched
from tests.test_scale_out import ask, loaded_stack
from tests.test_tune import sample_csv
from tests.test_worker import image_bytes, search
from web.app import create_app
from worker.aliases import serving_folder
from worker.evaluation.calibration import (
    MIN_QUERIES,
    MIN_VALUE_ITEMS,
    Calibration,
    fit_calibration,
    fit_curve,
    read_calibration,
    write_calibration,
)

IDENTITY = ("a" * 64, "stretch", 0)


def test_the_threshold_is_where_a_neighbour_becomes_right_more_often_than_wrong():
    rng = np.random.default_rng(3)
    similarities = rng.uniform(0, 1, 20_000)
    right = rng.uniform(0, 1, similarities.size) < 1 / (1 + np.exp(-30 * (similarities - 0.6)))
    curve = fit_curve(similarities, right)
    assert curve.threshold == pytest.approx(0.6, abs=0.03)
    assert curve.confidence(0.2) < 0.05 < 0.95 < curve.confidence(0.95)
    assert all(np.diff(curve.probabilities) >= 0) and len(curve.similarities) <= 64


def test_a_curve_never_right_at_half_calls_nothing_close_and_one_always_right_calls_everything_close():
    similarities = np.linspace(0, 1, 500)
    assert fit_curve(similarities, np.zeros(500, dtype=bool)).threshold == 1.0
    assert fit_curve(similarities, np.ones(500, dtype=bool)).threshold == -1.0


def catalogue_of(values: list[str]) -> list[dict[str, str]]:
    return [{"kind": value} for value in values]


def test_a_value_with_enough_items_gets_its_own_fit_and_the_others_use_the_overall_one():
    """A neighbour that is a shirt is right from similarity 0.8 up, a hat from 0.4 up; the wrong neighbours are socks,
    too few for a fit of their own."""
    kinds = ["shirt"] * MIN_VALUE_ITEMS + ["hat"] * MIN_VALUE_ITEMS + ["sock"] * (MIN_VALUE_ITEMS // 2)
    rng = np.random.default_rng(5)
    neighbours = rng.integers(0, 2 * MIN_VALUE_ITEMS, size=(4000, 1))  # a shirt or a hat, at random
    similarities = rng.uniform(0.2, 1.0, size=(4000, 1))
    cut = {"shirt": 0.8, "hat": 0.4}
    queries = [{"kind": kinds[position] if score >= cut[kinds[position]] else "sock"}
               for position, score in zip(neighbours[:, 0], similarities[:, 0], strict=True)]  # fmt: skip
    calibration = fit_calibration(["kind"], queries, catalogue_of(kinds), neighbours, similarities, IDENTITY)
    assert set(calibration.values) == {"shirt", "hat"}
    assert calibration.values["shirt"].threshold == pytest.approx(0.8, abs=0.05)
    assert calibration.values["hat"].threshold == pytest.approx(0.4, abs=0.05)
    assert calibration.curve_for({"kind": "sock"}) is calibration.overall
    assert calibration.items == len(queries) and 0 <= calibration.no_close_match <= 1

    hits = [{"id": "1", "score": 0.7, "metadata": {"kind": "shirt"}}, {"id": "2", "score": 0.6, "metadata": {}}]
    verdict = calibration.annotate(hits)
    assert verdict == {"close_match": False, "threshold": calibration.values["shirt"].threshold}
    assert hits[0]["confidence"] < 0.5 and 0 <= hits[1]["confidence"] <= 1
    hat = [{"id": "3", "score": 0.7, "metadata": {"kind": "hat"}}]
    assert calibration.annotate(hat)["close_match"] and hat[0]["confidence"] > 0.5


def test_a_value_no_query_met_gets_no_fit_of_its_own_however_many_items_it_has():
    """Every neighbour is a shirt, right for a shirt and wrong for a cap: the caps have no neighbours to fit."""
    kinds = ["shirt"] * MIN_VALUE_ITEMS + ["cap"] * MIN_VALUE_ITEMS
    queries = catalogue_of(["shirt", "cap"] * MIN_VALUE_ITEMS)
    neighbours = np.arange(len(queries)).reshape(-1, 1) % MIN_VALUE_ITEMS
    similarities = np.array([[0.9], [0.3]] * MIN_VALUE_ITEMS)
    calibration = fit_calibration(["kind"], queries, catalogue_of(kinds), neighbours, similarities, IDENTITY)
    assert set(calibration.values) == {"shirt"} and calibration.curve_for({"kind": "cap"}) is calibration.overall
    assert 0.3 < calibration.overall.threshold < 0.9


def test_neighbours_all_right_or_all_wrong_leave_no_threshold_to_find():
    kinds = catalogue_of(["shirt"] * MIN_VALUE_ITEMS)
    neighbours = np.arange(MIN_VALUE_ITEMS).reshape(-1, 1)
    similarities = np.linspace(0, 1, MIN_VALUE_ITEMS).reshape(-1, 1)
    with pytest.raises(UsageError, match=r"^every one of the 50 neighbours .* of the 50 queries shares their kind: "
                       "with no wrong neighbour there is no threshold to find"):  # fmt: skip
        fit_calibration(["kind"], kinds, kinds, neighbours, similarities, IDENTITY)
    caps = catalogue_of(["cap"] * MIN_VALUE_ITEMS)
    with pytest.raises(UsageError, match=r"^none of the 50 neighbours .* shares their kind: with no right neighbour"):
        fit_calibration(["kind"], caps, kinds, neighbours, similarities, IDENTITY)


def calibrate(data_dir: Path, model: Path, catalogue: Path, *options: str) -> subprocess.CompletedProcess:
    """`lookalike evaluate --calibrate`, without an index owner to store the fit: these are refused before that."""
    return subprocess.run(
        [LOOKALIKE, "evaluate", "--model", model, "--catalog", catalogue, *options, "--calibrate"],
        capture_output=True, text=True, env={"LOOKALIKE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_calibration_for_a_label_no_item_has_is_refused_naming_the_columns(tmp_path, shared_dir, pretrained_model):
    result = calibrate(tmp_path, pretrained_model, sample_csv(tmp_path / "catalogue.csv", shared_dir, 6), "--label",
                       "articleType", "--label", "colour")  # fmt: skip
    columns = "gender, masterCategory, subCategory, articleType, baseColour, season, year, usage, ..."
    assert (result.returncode, result.stderr) == (
        2, f"lookalike evaluate: error: label 'colour' is in no item of the catalogue: name one of its columns "
        f"({columns})\n")  # fmt: skip


def test_a_calibration_on_a_few_queries_is_refused_before_anything_is_embedded(tmp_path, shared_dir, pretrained_model):
    """Three photos make no threshold (one against the whole sample crashed fitting a value of 50 items that none of
    its neighbours had)."""
    catalogue = sample_csv(tmp_path / "catalogue.csv", shared_dir, 60)
    queries = sample_csv(tmp_path / "queries.csv", shared_dir, 3)
    result = calibrate(tmp_path, pretrained_model, catalogue, "--queries", queries, "--label", "subCategory")
    assert (result.returncode, result.stderr) == (
        2, f"lookalike evaluate: error: a calibration needs at least {MIN_QUERIES} queries with a value of "
        "subCategory and a neighbour (3 of the 3 queries have a value): give more labelled queries\n")  # fmt: skip


def test_a_one_item_catalogue_is_refused_a_calibration(tmp_path, shared_dir, pretrained_model):
    """Its one photo has no neighbour but itself, which called everything a close match."""
    result = calibrate(tmp_path, pretrained_model, sample_csv(tmp_path / "one.csv", shared_dir, 1), "--label",
                       "articleType")  # fmt: skip
    assert (result.returncode, result.stderr) == (
        2, f"lookalike evaluate: error: a calibration needs at least {MIN_QUERIES} queries with a value of "
        "articleType and a neighbour (the catalogue has 1 item): load more labelled items\n")  # fmt: skip


def test_a_catalogue_whose_every_neighbour_is_right_is_refused_a_calibration(tmp_path, shared_dir, pretrained_model):
    """Men's products calibrated on gender: no neighbour is wrong, so nothing says where one becomes wrong."""
    men = sample_csv(tmp_path / "men.csv", shared_dir, MIN_QUERIES + 1, gender="Men")
    result = calibrate(tmp_path, pretrained_model, men, "--label", "gender")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "lookalike evaluate: error: every one of the 1,020 neighbours (nearest and drawn at random) of the 51 queries "
        "shares their gender: with no wrong neighbour there is no threshold to find; a calibration needs items of "
        "more than one gender"
    )


def test_a_calibration_is_stored_whole_and_knows_the_vectors_it_was_fitted_for(tmp_path):
    kinds = ["a", "b"] * 60
    neighbours = np.array([[(row + 2) % len(kinds), (row + 1) % len(kinds)] for row in range(len(kinds))])
    similarities = np.tile([0.9, 0.3], (len(kinds), 1))
    calibration = fit_calibration(["kind"], catalogue_of(kinds), catalogue_of(kinds), neighbours, similarities,
                                  IDENTITY)  # fmt: skip
    write_calibration(tmp_path, calibration)
    assert read_calibration(tmp_path) == calibration and read_calibration(tmp_path / "elsewhere") is None
    assert calibration.mismatch(*IDENTITY) is None
    problem = calibration.mismatch("b" * 64, "stretch", 0)
    assert "model aaaaaaaaaaaa" in problem and "lookalike evaluate --calibrate" in problem
    assert "PCA 64" in calibration.mismatch("a" * 64, "stretch", 64)
    with pytest.raises(ValueError):
        Calibration.from_dict({"format": "something else"})


def flat_photo(colour: tuple[int, int, int]) -> bytes:
    """A photo of nothing in the catalogue: one colour, no product."""
    buffer = io.BytesIO()
    Image.new("RGB", (300, 400), colour).save(buffer, "PNG")
    return buffer.getvalue()


def replica_confidence(client, item_id: str) -> bool:
    hits = ask(client, "replica", Task.SIMILAR_ITEMS, item_id, 3, {}, 0)["hits"]
    return all("confidence" in hit for hit in hits)


@pytest.mark.slow
def test_a_calibrated_index_says_when_there_is_no_close_match(make_stack, shared_dir, pretrained_model, tmp_path):
    """`lookalike evaluate --calibrate` on the shared sample stores articleType's fit with the serving index: a
    catalogue photo is a close match with its confidence, a flat grey photo is not (and its page says so); the
    replica and, after a restart, the owner use it; a calibration of other vectors is refused."""
    stack, client, _ = loaded_stack(make_stack, shared_dir)
    photo = image_bytes(shared_dir, "10186")
    before = search(client, photo)
    assert before["state"] == "done" and "close_match" not in before["result"]
    assert all("confidence" not in hit for hit in before["result"]["hits"])
    assert create_app(stack.settings).test_client().get("/healthz").get_json()["index"]["calibration"] is None

    command = [LOOKALIKE, "evaluate", "--model", pretrained_model, "--catalog", shared_dir / "data" / "fashion",
               "--label", "articleType", "--calibrate"]  # fmt: skip
    calibrated = subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=600)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "no close match below similarity" in calibrated.stdout and "stored with index" in calibrated.stdout
    assert "of the catalogue's own photos would find no close match" in calibrated.stdout
    # the replica answers the searches: it takes the published calibration within about a second
    stack.wait_for(lambda: replica_confidence(client, "10186"), "the replica to use the calibration", timeout=30)

    found = search(client, photo)["result"]
    assert found["close_match"] is True and found["hits"][0]["id"] == "10186"
    assert found["hits"][0]["confidence"] > 0.5 and all(0 <= hit["confidence"] <= 1 for hit in found["hits"])
    nothing = search(client, flat_photo((128, 128, 128)))
    assert nothing["result"]["close_match"] is False
    assert nothing["result"]["hits"][0]["score"] < nothing["result"]["threshold"]
    web = create_app(stack.settings).test_client()
    page = web.get(f"/jobs/{nothing['id']}").get_data(as_text=True)
    assert "No close match" in page and "<details>" in page and "likely the same kind" in page
    assert "No close match" not in web.get(f"/jobs/{search(client, photo)['id']}").get_data(as_text=True)
    # More like this gets the same verdict: a shirt is close to shirts, not to any watch
    shirts = web.get("/api/items/10186/similar?k=3&filter=articleType=Shirts").get_json()
    assert shirts["close_match"] is True and shirts["hits"][0]["confidence"] > 0.5
    watches = web.get("/api/items/10186/similar?k=3&filter=articleType=Watches").get_json()
    assert watches["close_match"] is False and watches["hits"][0]["score"] < watches["threshold"]
    assert "More like this" in web.get("/items/10186").get_data(as_text=True)
    grey = stack.settings.uploads_dir / "grey"
    grey.mkdir(parents=True)
    (grey / "grey.png").write_bytes(flat_photo((128, 128, 128)))
    assert client.follow(client.start_load(grey), timeout=120)["state"] == "done"
    page = web.get("/items/grey").get_data(as_text=True)
    assert "No close match" in page and "close enough to this product" in page and "<details>" in page
    # /healthz reads the owner's heartbeat, published within a second of a change
    health = stack.wait_for(lambda: web.get("/healthz").get_json()["index"].get("calibration"), "the owner's heartbeat")
    assert health["labels"] == ["articleType"] and health["threshold"] == found["threshold"]

    listed = subprocess.run([LOOKALIKE, "index", "list"], env=stack.env, capture_output=True, text=True, check=True)
    assert "serving" in listed.stdout and "calibrated: articleType" in listed.stdout

    stored = json.loads((serving_folder(stack.settings.index_dir) / "calibration.json").read_text())
    with pytest.raises(ReadError) as refused:
        client.calibrate_index({**stored, "model_sha256": "0" * 64})
    assert refused.value.code == "model_mismatch" and "fitted with model 000000000000" in str(refused.value)

    stack.kill("index")
    stack.start("index")
    stack.wait_for(lambda: (stack.heartbeat(Role.INDEX) or [{}])[0].get("calibration"), "the owner's calibration")
    hits = ask(client, "owner", Task.SIMILAR_ITEMS, "10186", 3, {}, 0)["hits"]
    assert all("confidence" in hit for hit in hits)

    # A calibration belongs to its index: an index built for another model starts without one, a rollback to the
    # calibrated index brings it back
    built = client.build_index(str(another_model(pretrained_model, tmp_path)))
    stack.wait_for(lambda: switched(stack, built["index_id"]), "the switch", timeout=300)
    assert owner_beat(stack)["calibration"] is None
    assert "close_match" not in search(client, photo)["result"]
    client.rollback_index()
    stack.wait_for(lambda: owner_beat(stack)["calibration"], "the calibrated index to serve again")
