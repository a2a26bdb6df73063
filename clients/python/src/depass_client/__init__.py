"""Python SDK of DePass Serve: exact additive attributions of causal LMs over HTTP.

>>> from depass_client import Client
>>> client = Client()  # DEPASS_BASE_URL, DEPASS_API_KEY  # doctest: +SKIP
>>> client.attribute(prompt="The capital of France is").top_k(3)  # doctest: +SKIP
"""

from depass_client._base import __version__
from depass_client._batch import BatchRow, attribution_from_row, read_batch
from depass_client._client import AsyncClient, Client
from depass_client._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DePassError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceTimeoutError,
    UnprocessableEntityError,
)
from depass_client._retry import RetryPolicy
from depass_client._types import Attribution, Generation, ModelCard, Tokenization

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "Attribution",
    "AuthenticationError",
    "BadRequestError",
    "BatchRow",
    "Client",
    "DePassError",
    "Generation",
    "InternalServerError",
    "ModelCard",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceTimeoutError",
    "Tokenization",
    "UnprocessableEntityError",
    "__version__",
    "attribution_from_row",
    "read_batch",
]
