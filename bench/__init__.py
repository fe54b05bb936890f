"""Benchmark: the bare model, a bare in-process loop, and the service end to end, in one run."""
