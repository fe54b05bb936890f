"""``python -m api``: serve the HTTP API with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from api.app import create_app
from api.connection import guarded_protocol
from shared.logs import configure_logging
from shared.model_catalog import CatalogError
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging("api", settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except CatalogError as exc:
        sys.exit(f"api cannot start: {exc}")
    logging.getLogger("api").info("api starting", extra={"host": settings.host, "port": settings.port})
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.header_timeout_s, settings.max_header_bytes),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
