"""trio-kv: a KV-cache server for LLM inference on one Trio event loop."""

__version__ = "0.1.0"
