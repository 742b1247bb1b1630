"""Local upstreams that speak each provider's exact wire format, for tests and the benchmark."""
