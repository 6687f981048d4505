"""OpenAI-compatible HTTP gateway and NATS JSON API."""
