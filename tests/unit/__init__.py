"""In-process tests: no Redis server, no service processes."""
