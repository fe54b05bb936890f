"""The Celery app for Celery's own command line, configured like the service's processes.

``celery -A shared.celery_tools inspect active_queues``, ``... inspect stats``, ``... events`` and
``... flower`` then use the same broker, transport and options as the API and the workers.
"""

from __future__ import annotations

from shared.celery_app import create_celery_app
from shared.settings import get_settings

app = create_celery_app(get_settings())
