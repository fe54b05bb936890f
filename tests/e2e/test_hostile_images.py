"""Malformed and malicious images: a clear 400 each, the worker survives, other work goes on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from devtools.photos import EXAMPLES
from tests.support.hostile_images import accepted, refused
from tests.support.images import data_uri
from tests.support.jobs import all_results, submit, wait_done
from tests.support.stack import Stack

GOOD = data_uri((EXAMPLES / "cmp1.jpg").read_bytes())


@pytest.mark.parametrize("name", sorted(refused()))
def test_refused_with_index_and_reason(service: Stack, name: str) -> None:
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"input": [GOOD, data_uri(refused()[name], "image/png"), GOOD]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input[1]" and error["message"].startswith("input[1]: ")
    assert error["code"] in ("invalid_image", "image_too_large")


@pytest.mark.parametrize("name", sorted(accepted()))
def test_odd_but_valid_images_are_embedded(service: Stack, name: str) -> None:
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"input": data_uri(accepted()[name])})
    assert response.status_code == 200, response.text


def test_hostile_requests_do_not_disturb_good_ones(service: Stack) -> None:
    """Hostile and good requests at once: every good one succeeds, and the worker is still there."""
    hostile = [data_uri(data) for data in refused().values()]

    def good(_: int) -> int:
        with service.client() as client:
            return client.post("/v1/embeddings", json={"input": [GOOD, GOOD]}).status_code

    def bad(item: str) -> int:
        with service.client() as client:
            return client.post("/v1/embeddings", json={"input": [item]}).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        good_codes = pool.map(good, range(24))
        bad_codes = pool.map(bad, hostile)
        assert set(good_codes) == {200} and set(bad_codes) == {400}
    assert service.worker.alive()
    with service.client() as client:
        assert client.get("/ready").status_code == 200


def test_hostile_items_fail_in_place_in_a_job(service: Stack) -> None:
    names = sorted(refused())
    inputs = [GOOD] + [data_uri(refused()[name]) for name in names] + [GOOD]
    with service.client() as client:
        job = submit(client, {"input": inputs})
        state = wait_done(client, job["id"])
        assert (state["completed"], state["failed"]) == (2, len(names))
        items = all_results(client, job["id"])
        assert "embedding" in items[0] and "embedding" in items[-1]
        assert all(items[i + 1]["error"]["code"] in ("invalid_image", "image_too_large") for i in range(len(names)))
