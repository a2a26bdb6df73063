"""Service settings: one pydantic-settings class, read from ``DEPASS_*`` environment variables.

Every limit an operator may want to tune lives here, with its default; ``GET /v1/model``
reports the limits in force so that clients can size their requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The model that ships in the repository (built by ``make model``).
DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "models" / "depass-tiny"

MiB = 1024**2


class ModelNotFoundError(RuntimeError):
    """The configured model folder does not exist; the message says how to get one."""


#: The input limit when neither DEPASS_MAX_INPUT_TOKENS nor the model says less.
DEFAULT_MAX_INPUT_TOKENS = 2048


def input_limit(configured: int | None, model_positions: int | None) -> int:
    """The longest input served: the operator's setting when given, else the positions
    the model was built for (``max_position_embeddings``), at most the default."""
    if configured is not None:
        return configured
    if model_positions is None or model_positions < 1:
        return DEFAULT_MAX_INPUT_TOKENS
    return min(DEFAULT_MAX_INPUT_TOKENS, model_positions)


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix ``DEPASS_``)."""

    model_config = SettingsConfigDict(env_prefix="DEPASS_", extra="ignore", frozen=True)

    model: str = Field(
        str(DEFAULT_MODEL_DIR),
        description="Hugging Face hub id, local model folder or .gguf file; default: the "
        "embedded model.",
    )
    gguf_cache_dir: Path | None = Field(
        None,
        description="Where a .gguf model's dequantised weights are cached as safetensors "
        "(4 bytes per parameter; the first start converts, later ones read the cache); "
        "unset: ~/.cache/depass/gguf.",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    device_map: str | None = Field(
        None,
        description="Spread one model over every visible GPU with accelerate: 'auto', "
        "'balanced', 'sequential' (unset: the whole model on DEPASS_DEVICE).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on CUDA, float32 on the CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Let transformers run code shipped with a hub model (off: safer)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1/* routes require 'Authorization: Bearer <key>'."
    )
    max_input_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest accepted input, in tokens; unset: the model's "
        f"max_position_embeddings, at most {DEFAULT_MAX_INPUT_TOKENS}. Set it to serve "
        "inputs longer than the model was built for.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Largest max_new_tokens for /v1/generate.")
    max_queue: int = Field(16, ge=1, description="Requests waiting for the worker before 429.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="Seconds a request may wait and run before it gets 504."
    )
    max_response_bytes: int = Field(
        256 * MiB, ge=1, description="Largest array payload a response may carry (else 413)."
    )
    max_body_bytes: int = Field(
        64 * MiB, ge=1, description="Largest request body accepted (else 413, before parsing)."
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=MiB,
        description="All the memory one request may use beyond the weights (trace, "
        "components, chunked work; else 413); unset: measured at start-up, the GPU's free "
        "memory less 2 GiB, or half the available RAM on the CPU.",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Dtype the components are kept and split in (bfloat16 halves their memory; "
        "float32 keeps conservation tight).",
    )
    matmul_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the propagation's matrix products; auto: the weights' 16-bit "
        "dtype on CUDA (tensor cores, float32 accumulation), the compute dtype elsewhere.",
    )
    compile: bool = Field(
        False,
        description="Fuse the softmax MLP split with torch.compile (seconds of compilation "
        "at the first request, then a faster split).",
    )
    max_batch: int = Field(
        8, ge=1, description="Most queued attribution requests run together as one batch."
    )
    batch_max_cells: int = Field(
        4096,
        ge=0,
        description="Requests with at most this many (components + 1) x tokens may be "
        "batched; bigger ones run alone.",
    )
    trace_cache_size: int = Field(
        8, ge=0, description="Forward passes kept per prompt (LRU) for repeated prompts."
    )
    trace_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="Also evict cached forward passes while they hold more than this many "
        "bytes (the newest one is always kept); unset: no byte limit.",
    )
    docs_enabled: bool = Field(True, description="Serve /docs, /redoc and /openapi.json.")
    ui_enabled: bool = Field(True, description="Serve the web viewer at /ui.")
    protect_metrics: bool = Field(
        False, description="With DEPASS_API_KEY set, /metrics also needs the key."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service and of uvicorn."
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM."
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @field_validator("device_map")
    @classmethod
    def _empty_map_is_none(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip()

    @field_validator("gguf_cache_dir", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trace_cache_bytes", "memory_budget_bytes", "max_input_tokens", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty ``DEPASS_TRACE_CACHE_BYTES=`` (as in .env.example) means no byte limit,
        an empty ``DEPASS_MEMORY_BUDGET_BYTES=`` the measured budget, an empty
        ``DEPASS_MAX_INPUT_TOKENS=`` the model's own limit (at most 2048)."""
        return None if isinstance(value, str) and not value.strip() else value

    def resolved_device(self) -> str:
        """The torch device to load on: ``auto`` picks CUDA when one is visible."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def model_name(self) -> str:
        """A short public name: the folder name of a local model, the file name (less
        ``.gguf``) of a GGUF file, else the hub id."""
        path = Path(self.model).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            return path.stem
        return path.name if path.is_dir() else self.model

    def check_model_source(self) -> None:
        """Fail early, with directions, when a local model folder is missing.

        Raises:
            ModelNotFoundError: the default model has not been built, or ``DEPASS_MODEL``
                names a local path (absolute, ``./``, ``~``) that does not exist.
        """
        path = Path(self.model).expanduser()
        if path.exists():
            return
        if path == DEFAULT_MODEL_DIR:
            raise ModelNotFoundError(
                f"the embedded default model is missing at {path}; build it with `make model`, "
                "or set DEPASS_MODEL to a hub id (e.g. meta-llama/Llama-3.2-1B) or a model folder"
            )
        if self.model.startswith(("/", ".", "~")):
            raise ModelNotFoundError(
                f"DEPASS_MODEL={self.model!r} does not exist; give a model folder saved with "
                "save_pretrained, a .gguf file, or a hub id"
            )
