"""Loading a model and its tokenizer: hub ids, model folders and GGUF files.

A GGUF file (llama.cpp's quantised format) is dequantised to float32 by transformers
(``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package): ~20 s for
a 135M-parameter model on two CPU cores, ~50 s for 270M. The float32 weights are then
cached as a plain model folder (``config.json``, ``model.safetensors``, the tokenizer),
keyed by the file's SHA-256, so that every later load of the same file reads safetensors
in about a second. The cache takes 4 bytes per parameter (SmolLM2-135M: 0.5 GB,
Gemma-3-270M: 1.1 GB): the dequantised weights, not the quantised file's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

GGUF_SUFFIX = ".gguf"
#: Files of a cached folder, written last to first: a folder with its marker is complete.
_CACHE_MARKER = "source.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """A torch dtype from its name; ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def default_gguf_cache_dir() -> Path:
    """Where dequantised GGUF models are cached: ``$XDG_CACHE_HOME/depass/gguf``
    (``~/.cache/depass/gguf`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "depass" / "gguf"


def gguf_location(path_or_id: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model source names, or ``None`` for a hub id or model folder.

    Either ``path_or_id`` is a ``.gguf`` file, or it is a folder and ``gguf_file`` the
    file's name in it (transformers' own convention).

    Raises:
        FileNotFoundError: the named GGUF file does not exist.
    """
    if gguf_file is not None:
        path = Path(path_or_id).expanduser() / gguf_file
    elif path_or_id.lower().endswith(GGUF_SUFFIX):
        path = Path(path_or_id).expanduser()
    else:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    return path.resolve()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def causal_lm_class_name(config: Any) -> str | None:
    """The transformers causal-LM class a config loads as: its ``architectures`` entry,
    or (for GGUF metadata, which names none) the class mapped to its ``model_type``."""
    names = list(getattr(config, "architectures", None) or [])
    if names:
        return str(names[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))


def dequantised_folder(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """A model folder holding the weights of ``gguf`` in float32, made on first use.

    The folder is ``<cache_dir>/<sha256 of the file>``; it is written under a temporary
    name and renamed when complete, so an interrupted conversion leaves nothing that a
    later load would take for a model.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_gguf_cache_dir()
    digest = file_sha256(gguf)
    target = root / digest
    if (target / _CACHE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{digest}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        folder, name = str(gguf.parent), gguf.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = model.config
        config.architectures = [type(model).__name__]
        if hasattr(config, "quantization_config"):  # the weights are plain floats now
            del config.quantization_config
        config.save_pretrained(work)
        save_model(model, str(work / "model.safetensors"))  # tied weights stored once
        tokenizer.save_pretrained(work)
        source = {"gguf": str(gguf), "sha256": digest, "bytes": gguf.stat().st_size}
        (work / _CACHE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
        try:
            work.rename(target)
        except OSError:  # another process finished the same file first
            if not (target / _CACHE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder or hub id.

    ``AutoTokenizer`` in transformers 5 picks the tokenizer class from the model type
    (Qwen2Tokenizer for any qwen2 model), which re-tokenizes a plain ``tokenizer.json``
    of another kind (a word-level one, say) wrongly. When the folder's
    ``tokenizer_config.json`` names the generic fast tokenizer, load exactly that.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    declared = get_tokenizer_config(path_or_id).get("tokenizer_class")
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        return PreTrainedTokenizerFast.from_pretrained(path_or_id)
    return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)


def require_resident(model: nn.Module) -> None:
    """Refuse device maps that offload weights (parameters left on the meta device)."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"the device map offloads {len(offloaded)} tensors (e.g. {offloaded[0]}) to the CPU "
            "or disk; DePass reads every layer's weights, so they must be resident on a device"
        )


def load_pretrained(
    path_or_id: str,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    gguf_cache_dir: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """A supported causal LM with eager attention, and its tokenizer, from a hub id, a
    model folder or a GGUF file (:meth:`engine.DePassEngine.from_pretrained` documents
    the arguments). Unsupported families fail before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.families import family_named

    gguf = gguf_location(path_or_id, gguf_file)
    if gguf is not None:
        metadata = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        family_named([causal_lm_class_name(metadata) or metadata.model_type])
        path_or_id = str(dequantised_folder(gguf, gguf_cache_dir))
    config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    # fail fast, before loading weights, on unsupported families
    family_named([causal_lm_class_name(config) or str(config.model_type)])
    if device_map is not None and torch.cuda.is_available():
        device = "cuda"
    load = {
        "dtype": resolve_dtype(dtype, device),
        "attn_implementation": "eager",
        "trust_remote_code": trust_remote_code,
        **(model_kwargs or {}),
    }
    if device_map is None:
        # ``PreTrainedModel.to`` is ``functools.wraps``-decorated, which typeshed does not
        # bind as a method
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **load).to(device)  # type: ignore[arg-type]
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, device_map=device_map, **load)
        require_resident(model)
    tokenizer = load_tokenizer(path_or_id, trust_remote_code=trust_remote_code)
    return model, tokenizer
