"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache."""
