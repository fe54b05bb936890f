"""``python -m worker``: load the configured models, then consume their queues with Celery.

The steps are in ``worker.process``; this is their order.
"""

from __future__ import annotations

from shared.logs import configure_logging
from shared.settings import get_settings
from worker.process import (
    check_models_allowed,
    connect_signals,
    consume,
    create_app,
    heartbeat_for,
    install,
    limit_malloc_arenas,
    load_worker,
    node_name,
    pin_cpus,
    serve_metrics,
)


def main() -> None:
    limit_malloc_arenas()  # before any thread starts
    settings = get_settings()
    pin_cpus(settings)
    configure_logging("worker", settings.log_level, settings.log_json)
    check_models_allowed(settings)
    metrics_port = serve_metrics(settings)
    app = create_app(settings)
    worker = load_worker(settings, node_name())
    install(worker)
    connect_signals(settings, worker, heartbeat_for(settings, worker), metrics_port)
    consume(app, settings, worker.resources.node)
    worker.stop()


if __name__ == "__main__":
    main()
