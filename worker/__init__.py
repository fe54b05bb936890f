"""The Celery worker: preloads its models, batches images across requests, stores results in Redis."""
