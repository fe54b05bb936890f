"""Code both the API and the worker import: settings, message shapes, names of queues and keys."""
