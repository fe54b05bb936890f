"""The service's other routes: models, health, readiness, effective settings, docs, request ids."""

from __future__ import annotations

from tests.support.stack import SERVED, Stack


def test_models_lists_allow_list_with_served_details(service: Stack) -> None:
    with service.client() as client:
        body = client.get("/v1/models").json()
    cards = {card["id"]: card for card in body["data"]}
    assert body["object"] == "list"
    for name in SERVED:
        card = cards[service.model(name)]
        assert card["served"] is True and card["workers"] >= 1 and card["object"] == "model"
    dinov3 = cards[service.model("dinov3-tiny")]
    assert (dinov3["dim"], dinov3["patch_size"], dinov3["image_size"], dinov3["num_register_tokens"]) == (32, 16, [64, 64], 4)
    dinov2 = cards[service.model("dinov2-tiny")]
    assert (dinov2["patch_size"], dinov2["image_size"], dinov2["num_register_tokens"], dinov2["tokens_per_image"]) == (14, [56, 56], 0, 17)
    unserved = cards[service.model("unserved")]
    assert unserved["served"] is False and unserved["workers"] == 0 and unserved["dim"] is None


def test_health_ready_info_docs(service: Stack) -> None:
    with service.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["workers"] >= 1
        info = client.get("/info").json()
        settings = info["settings"]
        assert settings["max_image_pixels"] > 0 and settings["max_request_bytes"] > 0 and settings["url_fetch_timeout_s"] > 0
        assert "api_keys" not in settings and "hf_token" not in settings
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").json()["info"]["title"] == "Imbeddings"


def test_request_id_is_echoed_or_generated(service: Stack) -> None:
    with service.client() as client:
        assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
        generated = client.get("/health").headers["x-request-id"]
        assert len(generated) == 32
        # Anything that could smuggle text into logs is replaced.
        assert client.get("/health", headers={"X-Request-ID": "bad id\twith tab"}).headers["x-request-id"] != "bad id\twith tab"
