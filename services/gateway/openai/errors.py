"""OpenAI error bodies: ``APIError`` (HTTP status + body) and one constructor per case."""

from __future__ import annotations

from typing import Any

from disagg.services.gateway.openai.request import Kind


class APIError(Exception):
    """An error the client is told about: HTTP status plus the OpenAI error body.

    `retry_after_s` (429, 503) becomes a Retry-After header; see `headers`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        *,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": error | {"code": self.code}}

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers of the reply."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a field is missing, of the wrong type, out of range or unsupported."""
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    """404 for a model name this gateway does not serve (vLLM's wording)."""
    return APIError(
        404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found"
    )


def authentication_failed() -> APIError:
    """401: missing or wrong API key (the key itself is never echoed back)."""
    message = "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'."
    return APIError(401, message, "authentication_error", None, "invalid_api_key")


def payload_too_large(limit_bytes: int) -> APIError:
    """413: the request body exceeds the gateway's limit."""
    message = f"The request body is larger than this server's limit of {limit_bytes} bytes."
    return APIError(413, message, "invalid_request_error", None, "request_too_large")


def queue_full(retry_after_s: int = 1) -> APIError:
    """429: too many requests in flight; retry after `retry_after_s` seconds."""
    message = "The server is at capacity. Please retry your request later."
    return APIError(
        429, message, "rate_limit_error", None, "queue_full", retry_after_s=retry_after_s
    )


def service_unavailable(message: str, retry_after_s: int | None = None) -> APIError:
    """503: no worker can take the request now (e.g. no decode worker alive)."""
    code, type_ = "service_unavailable", "service_unavailable_error"
    return APIError(503, message, type_, None, code, retry_after_s=retry_after_s)


def gateway_timeout(message: str) -> APIError:
    """504: a bounded wait (placement, admit, first token, token gap) ran out."""
    return APIError(504, message, "timeout_error", None, "timeout")


def internal_error(message: str = "The server had an error processing your request.") -> APIError:
    """500: a bug or an unexpected worker failure."""
    return APIError(500, message, "server_error", None, "internal_error")


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, max_tokens: int | None, kind: Kind
) -> APIError:
    """400 with OpenAI's "maximum context length" message; `max_tokens` None means the prompt
    alone leaves no room for one generated token."""
    if kind == "chat":
        message = _chat_context_message(max_model_len, prompt_tokens, max_tokens)
        return invalid_request(message, "messages", "context_length_exceeded")
    completion = 0 if max_tokens is None else max_tokens
    message = (
        f"This model's maximum context length is {max_model_len} tokens, however you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in your prompt; {completion} for "
        "the completion). Please reduce your prompt; or completion length."
    )
    return invalid_request(message, "prompt", "context_length_exceeded")


def _chat_context_message(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> str:
    head = f"This model's maximum context length is {max_model_len} tokens. However, "
    if max_tokens is None:
        return head + (
            f"your messages resulted in {prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
    return head + (
        f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
    )
