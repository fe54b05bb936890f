"""Tooling for running Imbeddings locally and testing it: not imported by the API or the worker."""
