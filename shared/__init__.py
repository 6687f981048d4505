"""Code every disagg service shares: model runtime, KV cache, engine core, transfer, messages."""
