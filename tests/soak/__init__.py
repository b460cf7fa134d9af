"""The soak: a long mixed stream through one engine, checked against built-in prefix caching."""
