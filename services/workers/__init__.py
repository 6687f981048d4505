"""Prefill and decode worker cores (pure) and their NATS/ZeroMQ service shells."""
