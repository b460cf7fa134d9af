"""vLLM end to end: the engine against built-in prefix caching, startup, faults, the adapter's units."""
