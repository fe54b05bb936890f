"""Whole-process tests: a real Redis server, Celery worker processes, the HTTP API."""
