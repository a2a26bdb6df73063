"""Python SDK of DePass Serve: exact additive attributions of causal LMs over HTTP.

>>> from depass_client import Client
>>> client = Client()  # DEPASS_BASE_URL, DEPASS_API_KEY  # doctest: +SKIP
>>> client.attribute(prompt="The capital of France is").top_components(3)  # doctest: +SKIP
"""

from depass_client._base import NOT_GIVEN, NotGiven, __version__
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
from depass_client._params import (
    AttributionFields,
    AttributionParams,
    ChatMessage,
    GenerationFields,
    NextTokensFields,
)
from depass_client._retry import RetryPolicy
from depass_client._types import (
    Attribution,
    Generation,
    ModelCard,
    NextToken,
    NextTokens,
    Tokenization,
)

__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "Attribution",
    "AttributionFields",
    "AttributionParams",
    "AuthenticationError",
    "BadRequestError",
    "BatchRow",
    "ChatMessage",
    "Client",
    "DePassError",
    "Generation",
    "GenerationFields",
    "InternalServerError",
    "ModelCard",
    "NextToken",
    "NextTokens",
    "NextTokensFields",
    "NotFoundError",
    "NotGiven",
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
