"""Code both the API and the worker import: settings, message shapes, error codes, queue names, the Redis stores."""
