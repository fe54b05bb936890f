"""The one settings object, read from ``IMBEDDINGS_*`` environment variables.

Both processes (API and worker) read the same object so that limits, names and
timeouts can never disagree between the two sides of the queue.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.api_keys import ApiKey, parse_api_keys, read_keys_file
from shared.cpus import available_cpus, format_cpu_list, parse_cpu_list
from shared.sentinel import SentinelUrl, is_sentinel_url

REPO_ROOT = Path(__file__).resolve().parent.parent

CommaList = Annotated[list[str], NoDecode]

_TIMING_OPTIONS = {"socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry_on_timeout", "health_check_interval"}
# The one query option both kombu (the broker) and redis-py take; kombu fails with a TypeError on
# any other (db, password, username, ...), which would stop the worker after it loaded its models.
_URL_OPTIONS = {"ssl_cert_reqs"}


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMBEDDINGS_", extra="ignore", frozen=True)

    # --- wiring -----------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis used as Celery broker and result store, or the Sentinels (sentinel://) that find it.")
    redis_sentinel_master: str | None = Field(
        None, min_length=1, description="Name of the primary the Sentinels of a sentinel:// IMBEDDINGS_REDIS_URL monitor."
    )
    redis_key_prefix: str = Field("imb:", description="Prefix of every key Imbeddings itself writes.")
    default_model: str = Field("facebook/dinov2-small", description="Model used when a request names none.")
    worker_models: CommaList = Field(default_factory=list, description="Models a worker serves (default: the default model).")
    supported_models_file: Path = Field(REPO_ROOT / "supported_models.txt", description="Allow-list of model ids.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "IMBEDDINGS_HF_TOKEN"))

    # --- model execution --------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="What runs the forward pass: auto is OpenVINO on the CPU when installed, else PyTorch."
    )
    openvino_cache_dir: Path | None = Field(None, description="Where converted OpenVINO models are kept (default: ~/.cache/imbeddings/openvino).")
    openvino_streams: int = Field(
        2, ge=1, le=64, description="OpenVINO streams a batch is split over, each on its share of the forward-pass threads (at most one stream per thread)."
    )
    cuda_memory_fraction: float | None = Field(None, gt=0, le=1)
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_batch_wait_ms: float = Field(2.0, ge=0, le=10_000)
    preprocess_threads: int | None = Field(None, ge=1, le=256, description="Decode and preprocessing threads (default: from the worker's CPUs and device).")
    preprocessing: Literal["exact", "fast"] = Field(
        "fast", description="exact: call the Transformers image processor; fast: its own operations without a layout copy (bit-identical, checked at load)."
    )
    jpeg_draft: bool = Field(False, description="Let libjpeg decode large JPEGs at reduced scale (approximate).")
    worker_concurrency: int = Field(16, ge=1, le=1024, description="Celery task threads per worker (tasks in flight).")
    bulk_concurrency: int = Field(2, ge=1, le=256, description="Job chunks a worker embeds at once per model.")
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="Intra-op threads of the forward pass (default: OMP_NUM_THREADS when set, else the worker's CPUs)."
    )
    worker_cpus: Annotated[frozenset[int] | None, NoDecode] = Field(
        None, description="CPUs a worker may use, as a Linux CPU list such as 0-3,8 (default: all this process may use)."
    )
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="Port of a worker's /metrics (0: not served).")
    worker_metrics_host: str = "127.0.0.1"

    # --- request limits ---------------------------------------------------------------------
    max_request_bytes: int = Field(64 * 2**20, ge=1024)
    max_inputs_per_request: int = Field(256, ge=1)
    max_job_inputs: int = Field(100_000, ge=1)
    max_image_bytes: int = Field(20 * 2**20, ge=64)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_image_side: int = Field(16_384, ge=1)
    decode_cpu_seconds: float = Field(
        3.0, gt=0, le=600, description="CPU seconds one image may take to decode; past it the decode is killed and the image refused."
    )
    decode_max_bytes: int = Field(512 * 2**20, ge=16 * 2**20, description="Memory one image may need to decode, and its largest form after the model's resize.")
    max_image_segments: int = Field(10_000, ge=16, description="JPEG marker segments, PNG chunks or TIFF directory entries an image may have.")
    max_metadata_bytes: int = Field(8 * 2**20, ge=0, description="Bytes of JPEG APPn/COM segments or PNG ancillary chunks an image may carry.")
    jpeg_max_scans: int = Field(100, ge=1, description="Scans a (progressive) JPEG may have.")
    url_fetch_timeout_s: float = Field(10.0, gt=0, le=300)
    url_max_redirects: int = Field(3, ge=0, le=20)
    url_allowed_networks: CommaList = Field(default_factory=list)
    url_fetch_concurrency_per_request: int = Field(4, ge=1, le=256, description="URLs of one request or job chunk a worker fetches at once.")
    url_idle_connections: int = Field(32, ge=0, le=4096, description="Kept-alive connections to image servers a worker holds for reuse (0: none).")

    # --- the HTTP edge ----------------------------------------------------------------------
    max_buffered_bytes: int = Field(256 * 2**20, ge=1024, description="Request body bytes the API holds at once, across every request in flight.")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="A request's whole body must arrive within this long after its headers.")
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request's headers must arrive within this long of the connection opening (or of the request's first byte)."
    )
    max_header_bytes: int = Field(64 * 2**10, ge=1024, le=16 * 2**20, description="Size of a request's line and headers together.")
    keep_alive_timeout_s: int = Field(5, ge=1, le=600, description="An idle keep-alive connection is closed after this long.")

    # --- queueing and time ------------------------------------------------------------------
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="How long /v1/embeddings waits for a worker.")
    max_queue_depth: int = Field(1000, ge=1, description="Queued requests per model beyond which new ones get 429.")
    max_job_queue_depth: int = Field(50_000, ge=1, description="Queued job chunks per model beyond which new jobs get 429.")
    key_max_queued_images: int = Field(200_000, ge=1, description="Images one API key may have queued or in progress, requests and jobs together.")
    job_chunk_size: int = Field(16, ge=1, le=10_000, description="Images per job chunk task.")
    job_result_ttl_s: int = Field(24 * 3600, ge=1, description="Jobs and results are kept this long after their last update.")
    redis_max_bytes: int | None = Field(
        None,
        ge=2**20,
        description="Redis memory budget: work whose images would take Redis's used memory past it gets 507 (default: 80% of Redis's maxmemory).",
    )
    broker_visibility_timeout_s: int = Field(120, ge=5, description="An unacknowledged task is handed out again this long after delivery.")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_ttl_s: float = Field(20.0, gt=0)

    # --- access and observability -----------------------------------------------------------
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list, description="name:secret or bare-secret entries; unset: no authentication.")
    api_keys_file: Path | None = Field(None, description="File of API keys, one name:secret (or bare secret) per line; instead of IMBEDDINGS_API_KEYS.")
    docs_enabled: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    celery_events: bool = Field(True, description="Celery worker heartbeats and task events, so Flower and `celery events` see the fleet and its tasks.")

    _split = field_validator("worker_models", "url_allowed_networks", mode="before")(_split_commas)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_parse(cls, value: object) -> object:
        return parse_api_keys(value.split(",")) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _keys_file(self) -> Settings:
        if self.api_keys_file is None:
            return self
        if self.api_keys:
            raise ValueError("IMBEDDINGS_API_KEYS and IMBEDDINGS_API_KEYS_FILE are both set; set one")
        try:
            object.__setattr__(self, "api_keys", read_keys_file(self.api_keys_file))
        except ValueError as exc:
            raise ValueError(f"IMBEDDINGS_API_KEYS_FILE: {exc}") from None
        return self

    @field_validator("url_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not a CIDR network ({exc})") from None
        return value

    @field_validator("worker_cpus", mode="before")
    @classmethod
    def _cpu_list(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_cpu_list(value) if value.strip() else None
        return value

    @field_validator("worker_cpus")
    @classmethod
    def _cpus_available(cls, value: frozenset[int] | None) -> frozenset[int] | None:
        if value is None:
            return value
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("needs Linux (sched_setaffinity); leave it unset on this system")
        available = available_cpus()
        if not value <= available:
            raise ValueError(f"not available to this process: {format_cpu_list(value - available)} (it may use {format_cpu_list(available)})")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if is_sentinel_url(value):
            SentinelUrl.parse(value)
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")
        if _misplaced_userinfo(value):
            raise ValueError("has an '@' after a '/', '?' or '#': percent-encode those characters in the password (urllib.parse.quote)")
        options = {name for name, _ in parse_qsl(urlsplit(value).query, keep_blank_values=True)}
        if timing := sorted(options & _TIMING_OPTIONS):
            # Every timeout is chosen per use (README, "Timeouts").
            raise ValueError(
                f"timing options in the URL ({', '.join(timing)}) are not supported: Imbeddings sets each Redis timeout from the wait it serves; remove them"
            )
        if credentials := sorted(options & {"password", "username"}):
            raise ValueError(
                f"credentials in the query string ({', '.join(credentials)}) are not supported; put them before the host: redis://USER:PASSWORD@host:6379/0"
            )
        if other := sorted(options - _URL_OPTIONS):
            raise ValueError(
                f"URL options {', '.join(other)} are not supported (only ssl_cert_reqs); the database number goes in the path, redis://host:6379/DB"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.worker_models:
            object.__setattr__(self, "worker_models", [self.default_model])
        if is_sentinel_url(self.redis_url) and not self.redis_sentinel_master:
            raise ValueError("IMBEDDINGS_REDIS_URL lists Sentinels (sentinel://): set IMBEDDINGS_REDIS_SENTINEL_MASTER to the name of the primary they monitor")
        if self.redis_sentinel_master and not is_sentinel_url(self.redis_url):
            raise ValueError("IMBEDDINGS_REDIS_SENTINEL_MASTER is set, but IMBEDDINGS_REDIS_URL is not a sentinel:// URL")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("IMBEDDINGS_HEARTBEAT_TTL_S must be longer than IMBEDDINGS_HEARTBEAT_INTERVAL_S")
        if self.max_buffered_bytes < self.max_request_bytes:
            raise ValueError(
                "IMBEDDINGS_MAX_BUFFERED_BYTES must be at least IMBEDDINGS_MAX_REQUEST_BYTES, or a body of the largest allowed size could never be accepted"
            )
        return self

    def public_view(self) -> dict[str, object]:
        """Effective settings without secrets, for ``/info`` and start-up logs."""
        view = self.model_dump(mode="json", exclude={"hf_token", "api_keys", "redis_url"})
        view["redis_url"] = _redact_url(self.redis_url)
        view["hf_token_set"] = self.hf_token is not None
        view["api_keys_configured"] = len(self.api_keys)
        return view


def _misplaced_userinfo(url: str) -> bool:
    """An ``@`` outside the host part: a password with an unencoded ``/``, ``?`` or ``#``, which
    would be read as path, query or fragment (and shown as such)."""
    parts = urlsplit(url)
    return "@" in parts.path + parts.query + parts.fragment


def _redact_url(url: str) -> str:
    """The URL without its user info or any query value but the known harmless ones.

    The host starts after the *last* ``@``, as redis-py reads it: a password may contain ``@``.
    """
    parts = urlsplit(url)
    if _misplaced_userinfo(url):
        return f"{parts.scheme}://***"
    _, at, host = parts.netloc.rpartition("@")
    query = [(name, value if name in _URL_OPTIONS else "***") for name, value in parse_qsl(parts.query, keep_blank_values=True)]
    redacted = f"{parts.scheme}://{'***@' if at else ''}{host}{parts.path}"
    if query:
        redacted += "?" + urlencode(query, safe="*")
    return redacted + ("#***" if parts.fragment else "")


def describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        env = f"IMBEDDINGS_{field.upper()}" if field != "settings" else "configuration"
        if field == "hf_token":
            env = "HF_TOKEN"
        shown = item.get("input")
        if field == "redis_url" and isinstance(shown, str):
            shown = _redact_url(shown)
        got = f" (got {shown!r})" if isinstance(shown, (str, int, float)) and field not in ("hf_token", "api_keys") else ""
        lines.append(f"  {env}: {item['msg']}{got}")
    return "Invalid Imbeddings configuration:\n" + "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process; exits with a readable message when they are invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        print(describe_errors(exc), file=sys.stderr)
        raise SystemExit(2) from None
