"""Configuration: read from IMBEDDINGS_* variables, validated with messages that name the variable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.api_keys import derived_key_id
from shared.broker import SENTINEL_TRANSPORT, TRANSPORT, SentinelTransport, broker_connection
from shared.celery_app import create_celery_app
from shared.model_catalog import allowed_models, read_allow_list
from shared.redis_client import sync_client
from shared.settings import REPO_ROOT, Settings, describe_errors


def _start_up_error() -> str:
    """What the settings say when the environment stops the process at start."""
    with pytest.raises(ValidationError) as error:
        Settings()
    return describe_errors(error.value)


def test_defaults_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBEDDINGS_WORKER_MODELS", " a/b , c ")
    monkeypatch.setenv("IMBEDDINGS_API_KEYS", "k1,k2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    settings = Settings()
    assert settings.default_model == "facebook/dinov2-small"
    assert settings.worker_models == ["a/b", "c"]
    assert [k.secret.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    view = settings.public_view()
    assert "hf_secret" not in str(view) and "k1" not in str(view)
    assert view["hf_token_set"] is True and view["api_keys_configured"] == 2


def test_worker_models_default_to_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBEDDINGS_DEFAULT_MODEL", "/models/mine")
    assert Settings().worker_models == ["/models/mine"]


def test_named_and_bare_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBEDDINGS_API_KEYS", " search-team:sk-AAAA1111 , sk-bare-2222 ")
    keys = Settings().api_keys
    assert [(key.id, key.secret.get_secret_value()) for key in keys] == [("search-team", "sk-AAAA1111"), (derived_key_id("sk-bare-2222"), "sk-bare-2222")]
    # The derived id is stable (every API instance computes the same), short, and not the secret.
    assert keys[1].id == "key-" + hashlib.sha256(b"sk-bare-2222").hexdigest()[:12] and "2222" not in keys[1].id


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "lists no key"),
        (" , ", "lists no key"),
        ("a:", "empty secret"),
        ("bad name:sk-1", "entry 1: a key name"),
        ("a:sk-1,a:sk-2", "same key id 'a'"),
        ("a:sk-1,b:sk-1", "entries 1 and 2 have the same secret"),
    ],
)
def test_bad_api_keys_are_start_up_errors(monkeypatch: pytest.MonkeyPatch, value: str, needle: str) -> None:
    monkeypatch.setenv("IMBEDDINGS_API_KEYS", value)
    message = _start_up_error()
    assert "IMBEDDINGS_API_KEYS" in message and needle in message and "sk-1" not in message


def test_keys_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# one entry per line\nsearch:sk-with#hash-1\n\n  sk-bare-2  \n")
    monkeypatch.setenv("IMBEDDINGS_API_KEYS_FILE", str(path))
    keys = Settings().api_keys
    assert [(key.id, key.secret.get_secret_value()) for key in keys] == [("search", "sk-with#hash-1"), (derived_key_id("sk-bare-2"), "sk-bare-2")]


@pytest.mark.parametrize(
    ("content", "also_env", "needle"),
    [
        ("# nothing yet\n\n", None, "IMBEDDINGS_API_KEYS_FILE: is set but lists no key"),
        (None, None, "IMBEDDINGS_API_KEYS_FILE: cannot read"),
        ("a:sk-1\n", "b:sk-2", "IMBEDDINGS_API_KEYS and IMBEDDINGS_API_KEYS_FILE are both set"),
        ("a:sk-1\na:sk-2\n", None, "same key id 'a'"),
    ],
)
def test_bad_keys_files_are_start_up_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, also_env: str | None, needle: str) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("IMBEDDINGS_API_KEYS_FILE", str(path))
    if also_env:
        monkeypatch.setenv("IMBEDDINGS_API_KEYS", also_env)
    message = _start_up_error()
    assert needle in message and "sk-1" not in message and "sk-2" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://app:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://:t-P4ss@word@redis:6379/0", "redis://***@redis:6379/0"),
        ("rediss://:hunter2@redis:6380/1?ssl_cert_reqs=required", "rediss://***@redis:6380/1?ssl_cert_reqs=required"),
        ("unix://:hunter2@/run/redis.sock", "unix://***@/run/redis.sock"),
    ],
)
def test_redis_credentials_are_redacted(monkeypatch: pytest.MonkeyPatch, url: str, shown: str) -> None:
    monkeypatch.setenv("IMBEDDINGS_REDIS_URL", url)
    assert Settings().public_view()["redis_url"] == shown


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://redis:6379/0?password=hunter2", "credentials in the query string (password)"),
        ("unix:///run/redis.sock?username=app&password=hunter2", "credentials in the query string (password, username)"),
        ("redis://redis:6379?db=2", "URL options db are not supported"),
        ("redis://:hun?ter2@redis:6379/0", "percent-encode"),
    ],
)
def test_redis_url_options_kombu_cannot_take_are_refused(monkeypatch: pytest.MonkeyPatch, url: str, needle: str) -> None:
    monkeypatch.setenv("IMBEDDINGS_REDIS_URL", url)
    message = _start_up_error()
    assert "IMBEDDINGS_REDIS_URL" in message and needle in message
    assert "hunter2" not in message and "ter2" not in message


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("IMBEDDINGS_PORT", "eighty", "IMBEDDINGS_PORT"),
        ("IMBEDDINGS_DTYPE", "int4", "IMBEDDINGS_DTYPE"),
        ("IMBEDDINGS_DEVICE", "tpu", "IMBEDDINGS_DEVICE"),
        ("IMBEDDINGS_MAX_BATCH_SIZE", "0", "IMBEDDINGS_MAX_BATCH_SIZE"),
        ("IMBEDDINGS_OPENVINO_STREAMS", "0", "IMBEDDINGS_OPENVINO_STREAMS"),
        ("IMBEDDINGS_OPENVINO_STREAMS", "two", "IMBEDDINGS_OPENVINO_STREAMS"),
        ("IMBEDDINGS_URL_ALLOWED_NETWORKS", "10.0.0.0/33", "IMBEDDINGS_URL_ALLOWED_NETWORKS"),
        ("IMBEDDINGS_REDIS_URL", "http://redis", "IMBEDDINGS_REDIS_URL"),
        ("IMBEDDINGS_REDIS_URL", "redis://redis:6379/0?socket_timeout=90", "socket_timeout"),
        ("IMBEDDINGS_MAX_BUFFERED_BYTES", "1000000", "IMBEDDINGS_MAX_BUFFERED_BYTES must be at least IMBEDDINGS_MAX_REQUEST_BYTES"),
        ("IMBEDDINGS_HEADER_TIMEOUT_S", "0", "IMBEDDINGS_HEADER_TIMEOUT_S"),
        ("IMBEDDINGS_BODY_TIMEOUT_S", "soon", "IMBEDDINGS_BODY_TIMEOUT_S"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://", "empty Sentinel address"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://s1:26379,,s2:26379/0", "empty Sentinel address"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://s1:port/0", "'s1:port'"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://s1:26379/zero", "database after the hosts must be a number"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://s1:26379/0?socket_timeout=1", "options in a sentinel:// URL"),
        ("IMBEDDINGS_REDIS_URL", "sentinel://s1:26379/0", "IMBEDDINGS_REDIS_SENTINEL_MASTER"),
        ("IMBEDDINGS_REDIS_SENTINEL_MASTER", "mymaster", "IMBEDDINGS_REDIS_URL is not a sentinel:// URL"),
    ],
)
def test_invalid_values_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str) -> None:
    monkeypatch.setenv(name, value)
    assert needle in _start_up_error()


def test_sentinel_url_reaches_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBEDDINGS_REDIS_URL", "sentinel://:p%40ss@s1:26380, s2 ,[fd00::3]:26381/2")
    monkeypatch.setenv("IMBEDDINGS_REDIS_SENTINEL_MASTER", "imb-primary")
    settings = Settings()
    assert settings.public_view()["redis_url"] == "sentinel://***@s1:26380, s2 ,[fd00::3]:26381/2"
    broker = broker_connection(settings)
    assert broker.transport == SENTINEL_TRANSPORT
    assert broker.url == "sentinel://:p%40ss@s1:26380/2;sentinel://:p%40ss@s2:26379/2;sentinel://:p%40ss@[fd00::3]:26381/2"
    assert broker.transport_options["master_name"] == "imb-primary"
    # kombu moves to the next Sentinel's URL after a failed connect; the transport must stay ours (with the fix).
    connection = create_celery_app(settings).connection_for_write()
    assert connection.transport_options["master_name"] == "imb-primary"
    for _ in range(3):
        assert connection.get_transport_cls() is SentinelTransport
        connection.maybe_switch_next()
    # The clients the API and the workers build ask these Sentinels for that primary, with the server password.
    sync = sync_client(settings.redis_url, sentinel_master=settings.redis_sentinel_master)
    pool = sync.connection_pool
    assert (pool.service_name, pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("imb-primary", "p@ss", 2)
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"]) for c in pool.sentinel_manager.sentinels] == [
        ("s1", 26380), ("s2", 26379), ("fd00::3", 26381)
    ]
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs.get("password") is None


def test_plain_url_keeps_the_plain_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBEDDINGS_REDIS_URL", "redis://redis:6379/3")
    broker = broker_connection(Settings())
    assert (broker.url, broker.transport, broker.transport_options) == ("redis://redis:6379/3", TRANSPORT, {})


def test_allow_list_parsing(tmp_path) -> None:
    path = tmp_path / "models.txt"
    path.write_text("# comment\nfacebook/dinov2-small  # trailing comment\n\n/local/model\nfacebook/dinov2-small\n")
    assert read_allow_list(path) == ["facebook/dinov2-small", "/local/model"]
    assert allowed_models(path, "/air-gapped/default") == ["/air-gapped/default", "facebook/dinov2-small", "/local/model"]


def test_repo_allow_list_names_every_family() -> None:
    models = read_allow_list(REPO_ROOT / "supported_models.txt")
    for family in (
        "facebook/dinov2-small",
        "facebook/dinov2-with-registers-small",
        "facebook/dinov3-vits16-pretrain-lvd1689m",
        "facebook/dino-vits16",
        "facebook/webssl-dino300m-full2b-224",
        "facebook/deit-small-patch16-224",
        "google/vit-base-patch16-224",
    ):
        assert family in models
    assert not any("distilled" in model for model in models)


@pytest.mark.parametrize("value", ["1000", "lots", "-1"])
def test_a_bad_budget_is_refused_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IMBEDDINGS_REDIS_MAX_BYTES", value)
    assert "IMBEDDINGS_REDIS_MAX_BYTES" in _start_up_error()
