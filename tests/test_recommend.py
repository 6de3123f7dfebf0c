"""Recommendations from several examples: products like the positive ones and unlike the negative ones."""

from __future__ import annotations

import io

import numpy as np
import pytest

from common.settings import Settings
from common.vectors import AVERAGE_VECTOR, BEST_SCORE
from protocol.client import MAX_EXAMPLES
from tests.test_index import PARAMS, unit
from tests.test_products import add, near
from tests.test_web import follow, idle, photo  # noqa: F401 - idle is a fixture
from worker import runtime
from worker.index import Item, Photo, VectorIndex
from worker.queries import Search, _embedded


def normal(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def put(index: VectorIndex, item_id: str, vector: np.ndarray) -> None:
    index.upsert(item_id, normal(vector)[None], Item({}, [Photo(item_id)]))


def test_the_average_strategy_moves_away_from_the_negatives_and_never_answers_an_example():
    index = VectorIndex(PARAMS)
    liked, disliked = unit(1), unit(2)
    put(index, "liked", liked)
    put(index, "disliked", disliked)
    put(index, "bluish", liked + 0.5 * disliked)  # as like the positive as the next one, but like the negative too
    put(index, "clear", liked - 0.5 * disliked)
    alike = index.search(liked, 3, exclude=("liked",))
    assert {hit.id for hit in alike[:2]} == {"bluish", "clear"}  # a tie without the negative
    hits = index.recommend([liked[None]], [disliked[None]], 2, exclude=("liked", "disliked"))
    assert [hit.id for hit in hits] == ["clear", "bluish"]


def test_the_best_score_strategy_finds_what_is_like_any_one_positive_and_ranks_what_is_like_a_negative_last():
    index = VectorIndex(PARAMS)
    first, second, avoided = unit(1), unit(3), unit(4)
    put(index, "like-first", near(first, 10))
    put(index, "like-second", near(second, 11))
    put(index, "in-between", first + second)
    put(index, "like-avoided", near(first, 12, 0.05) * 0.3 + avoided)
    averaged = index.recommend([first[None], second[None]], [], 1, strategy=AVERAGE_VECTOR)
    assert averaged[0].id == "in-between"
    best = index.recommend([first[None], second[None]], [avoided[None]], 4, strategy=BEST_SCORE)
    assert {hit.id for hit in best[:2]} == {"like-first", "like-second"}
    assert best[2].id == "in-between" and best[2].score == pytest.approx(np.sqrt(0.5), abs=0.05)
    assert best[3].id == "like-avoided" and best[3].score < 0  # nearer the negative than any positive


def test_a_product_example_counts_once_whatever_its_number_of_photos():
    index = VectorIndex(PARAMS)
    add(index, "many", [1, 1, 1, 1])  # four photos of one look
    put(index, "one", unit(2))
    put(index, "first-look", near(unit(1), 20))
    put(index, "second-look", near(unit(2), 21))
    put(index, "between", unit(1) + unit(2))
    hits = index.recommend([index.vectors("many"), index.vectors("one")], [], 1, exclude=("many", "one"))
    assert hits[0].id == "between"  # the mean of the two products, not four parts of the first to one of the second
    with_photo = index.recommend([index.vectors("many")], [], 5, exclude=("many",), strategy=BEST_SCORE)
    assert with_photo[0].id == "first-look" and with_photo[0].photo == 0


def test_a_recommendation_needs_a_positive_example_a_known_strategy_and_at_most_the_documented_examples(idle):  # noqa: F811
    for body, reason in (
        ({"negative": ["10186"]}, "at least one positive example"),
        ({"positive": ["10186"], "strategy": "vibes"}, "`strategy` must be one of average_vector, best_score"),
        ({"positive": [str(n) for n in range(MAX_EXAMPLES + 1)]}, f"at most {MAX_EXAMPLES} examples"),
        ({"positive": ["a/b"]}, "is refused"),
        ({"positive": [{"id": "10186"}]}, "must be text or a number"),
        (["10186"], "must be an object"),
    ):
        response = idle.post("/api/recommend", json=body)
        assert response.status_code == 400 and reason in response.get_json()["error"]["message"], body
    deep = idle.post("/api/recommend", data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert deep.status_code == 400 and "nested too deeply" in deep.get_json()["error"]["message"]
    unreadable = idle.post("/api/recommend", data={"positive_image": (io.BytesIO(b"no photo"), "x.jpg")})
    assert unreadable.status_code == 415 and unreadable.get_json()["error"]["code"] == "not_an_image"
    anyone = idle.post("/api/recommend", json={"positive": ["10186"]})  # no key: public, as a search is
    assert anyone.status_code == 503 and anyone.get_json()["error"]["code"] == "no_worker"


@pytest.mark.slow
def test_recommendations_from_ids_and_photos_answer_products_that_are_none_of_the_examples(live, shared_dir):
    answered = live.post("/api/recommend?wait=10", json={"positive": ["10186", "22395"], "negative": ["10227"], "k": 5})
    assert answered.status_code == 200, answered.get_json()
    job = answered.get_json()
    assert job["state"] == "done" and job["params"]["strategy"] == "average_vector"
    hits = job["result"]["hits"]
    assert len(hits) == 5 and not {hit["id"] for hit in hits} & {"10186", "22395", "10227"}
    assert {hit["metadata"]["articleType"] for hit in hits} == {"Shirts"} and hits[0]["page_url"].startswith("/items/")
    form = {"positive_image": (io.BytesIO(photo(shared_dir, "10230")), "bag.jpg"), "negative": "10227", "k": "3",
            "filter": "gender=Women", "wait": "10"}  # fmt: skip
    by_photo = live.post("/api/recommend", data=form).get_json()
    assert by_photo["state"] == "done" and by_photo["params"]["positive"] == [{"photo": 0}]
    assert by_photo["result"]["hits"][0]["id"] == "10230"  # the photo is no product: its own is found
    assert all(hit["metadata"]["gender"] == "Women" and hit["id"] != "10227" for hit in by_photo["result"]["hits"])
    unknown = live.post("/api/recommend?wait=10", json={"positive": ["no-such-product"]}).get_json()
    assert unknown["state"] == "failed" and unknown["error"]["code"] == "not_found"


@pytest.mark.slow
def test_the_best_score_strategy_scores_each_product_by_the_positive_it_is_most_like(live):
    """A shirt and a handbag: each one's nearest product is answered with the score it has as that one's "more like
    this" (shirts are nearer each other than handbags are, so the handbag's comes later, not never)."""
    nearest = {item: live.get(f"/api/items/{item}/similar?k=1").get_json()["hits"][0] for item in ("10186", "10227")}
    best = live.post("/api/recommend", json={"positive": ["10186", "10227"], "k": 30, "strategy": "best_score",
                                             "wait": 10}).get_json()  # fmt: skip
    scores = {hit["id"]: hit["score"] for hit in best["result"]["hits"]}
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    for hit in nearest.values():
        assert scores.get(hit["id"]) == pytest.approx(hit["score"], abs=1e-4), (hit, scores)
    assert best["result"]["hits"][0]["id"] == nearest["10186"]["id"]


@pytest.mark.slow
def test_a_shopper_marks_results_more_or_less_like_this_and_searches_again_from_the_results_page(live, shared_dir):
    submitted = live.post("/search", data={"image": (io.BytesIO(photo(shared_dir, "10186")), "p.jpg"), "k": "4"})
    job_id = submitted.location.rsplit("/", 1)[1]
    first = follow(live, f"/api/jobs/{job_id}")
    page = live.get(submitted.location).get_data(as_text=True)
    assert page.count("more like this</label>") == 4 and page.count("less like this</label>") == 4
    assert f'name="from_job" value="{job_id}"' in page and 'action="/recommend"' in page
    liked, disliked = first["result"]["hits"][1]["id"], first["result"]["hits"][2]["id"]
    again = live.post("/recommend", data={"from_job": job_id, "positive": liked, "negative": disliked, "k": "4",
                                          "strategy": "average_vector"})  # fmt: skip
    assert again.status_code == 303 and again.location.startswith("/jobs/")
    refined = follow(live, "/api/jobs/" + again.location.rsplit("/", 1)[1])
    assert refined["params"]["positive"] == [{"photo": 0}, {"id": liked}]
    assert refined["params"]["negative"] == [{"id": disliked}]
    assert refined["state"] == "done" and not {liked, disliked} & {hit["id"] for hit in refined["result"]["hits"]}
    shown = live.get(again.location).get_data(as_text=True)
    assert "like your photo, " in shown and f'name="positive" value="{liked}"' in shown
    assert f'type="hidden" name="negative" value="{disliked}"' in shown


def test_the_photos_of_a_micro_batch_are_embedded_at_most_query_batch_at_a_time(monkeypatch):
    """A search of several photos counts each photo against LOOKALIKE_QUERY_BATCH; a recommendation by ids has none."""
    monkeypatch.setattr(runtime, "settings", lambda: Settings.from_env({"LOOKALIKE_QUERY_BATCH": "2"}))
    runs = []

    class Model:
        def embed(self, pixels: np.ndarray) -> np.ndarray:
            runs.append(len(pixels))
            return pixels.reshape(len(pixels), -1)[:, :1].astype(np.float32)

    def photos(*values: int) -> list[np.ndarray]:
        return [np.full((2, 2, 3), value, dtype=np.uint8) for value in values]

    searches = [Search("a", 1, {}, 0, photos(1)), Search("b", 1, {}, 0, []), Search("c", 1, {}, 0, photos(2, 3, 4))]
    vectors = _embedded(Model(), searches)
    assert runs == [2, 2] and [rows[:, 0].tolist() for rows in vectors] == [[1.0], [], [2.0, 3.0, 4.0]]
    assert [len(rows) for rows in _embedded(Model(), [Search("d", 1, {}, 0, [])])] == [0]
