"""The OpenAI protocol of /v1/completions and /v1/chat/completions, with no I/O.

Request bodies (already JSON-decoded) are validated strictly (``parse``, on ``fields``) and
turned into a ``request.GenerationRequest``; ``responses`` builds the response, stream-chunk and
usage bodies and ``errors`` the error bodies, in the exact shapes of the OpenAI API, with vLLM's
extensions where it defines them (``return_token_ids``, ``top_k``, ``stop_token_ids``,
``ignore_eos``, ``add_generation_prompt``).
"""
