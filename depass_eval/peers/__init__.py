"""The peer methods, AttnLRP (``lxt``) and ContextCite (``context-cite``), as token
baselines: each runs in its own virtual environment (``make peers`` builds them under
``build/peers/``) as a subprocess on the same saved weights, and returns scores.

Neither runs in this project's environment: lxt 2.1 imports names transformers 5 removed,
and both are tested by their authors on transformers 4.x. So each peer has a worker
script (``lxt_worker.py``, ``context_cite_worker.py``) that imports only the peer and
transformers; :class:`PeerProcess` starts it with the peer's interpreter, sends JSON
lines and reads JSON lines. The weights are the model's own folder (for a ``.gguf``
file, the engine's dequantised cache), with its ``config.json`` written again in the
form transformers 4.x reads (:func:`legacy_folder`); every AttnLRP reply carries the
target's logit, which must match the local model's (the check that both processes run
the same model).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
#: Where ``make peers`` builds the peers' environments.
PEERS_DIR = Path(os.environ.get("DEPASS_PEERS_DIR", REPO / "build" / "peers"))
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    """A peer method: its name in tables, its environment and its worker script."""

    method: str
    venv: str
    worker: str
    package: str

    @property
    def python(self) -> Path:
        return PEERS_DIR / self.venv / "bin" / "python"

    def missing(self) -> str | None:
        """Why the peer cannot run here (None: it can)."""
        if not (PEERS_DIR / self.venv / ".installed").exists():
            return f"{self.package}'s environment {PEERS_DIR / self.venv} is not built (make peers)"
        return None


PEERS: dict[str, Peer] = {
    "attnlrp": Peer("attnlrp", "lxt", "lxt_worker.py", "lxt 2.1"),
    "context-cite": Peer("context-cite", "context-cite", "context_cite_worker.py", "context-cite"),
}


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` as transformers 4.x reads it: 5.x keeps the rotary settings in
    ``rope_parameters`` (per layer type for Gemma 3), 4.x in ``rope_theta`` (and
    ``rope_local_base_freq``, ``sliding_window_pattern``), and ``dtype`` was
    ``torch_dtype``. Without this 4.x silently falls back to its default rope base."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if "full_attention" in rope:
            full, local = rope["full_attention"], rope.get("sliding_attention", {})
            out["rope_theta"] = full["rope_theta"]
            if "rope_theta" in local:
                out["rope_local_base_freq"] = local["rope_theta"]
            rope = full
        else:
            out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = rope
    if "_sliding_window_pattern" in out:
        out["sliding_window_pattern"] = out["_sliding_window_pattern"]
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def legacy_folder(folder: Path, into: Path) -> Path:
    """A folder with ``folder``'s files linked, its config in the 4.x form, the tokenizer
    class 5.x calls ``TokenizersBackend`` named as 4.x does (``PreTrainedTokenizerFast``)
    and its safetensors files marked ``format: pt`` (:func:`mark_pt_format`)."""
    into.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.suffix == ".safetensors":
            mark_pt_format(item, into / item.name)
        elif item.name == "tokenizer_config.json":
            settings = json.loads(item.read_text(encoding="utf-8"))
            if settings.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name
                settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            (into / item.name).write_text(json.dumps(settings, indent=1))
        elif item.name != "config.json":
            (into / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (into / "config.json").write_text(json.dumps(legacy_config(config), indent=1))
    return into


def mark_pt_format(source: Path, target: Path) -> None:
    """``source`` at ``target`` in the form transformers 4.x loads: ``"format": "pt"`` in
    the header's metadata, which 4.x requires (the engine's dequantised cache has none),
    and a tied tensor stored under one name and aliased in the metadata (5.x writes the
    tied embedding as ``lm_head.weight`` with ``model.embed_tokens.weight`` pointing to
    it) stored under the alias, the name 4.x loads before tying the head to it. The
    tensors' bytes are copied unchanged (their offsets count from the end of the
    header); a file that needs nothing is linked."""
    with source.open("rb") as src:
        size = struct.unpack("<Q", src.read(8))[0]
        header = json.loads(src.read(size))
        metadata = header.get("__metadata__") or {}
        aliases = {
            alias: name
            for alias, name in metadata.items()
            if alias not in header and isinstance(name, str) and name in header
        }
        if metadata.get("format") == "pt" and not aliases:
            target.symlink_to(source.resolve())
            return
        for alias, name in aliases.items():
            header[alias] = header.pop(name)
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with target.open("wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(src, out, 1 << 24)


class PeerError(RuntimeError):
    """A peer's worker failed or answered wrongly."""


class PeerProcess:
    """One peer's worker on one model folder: JSON lines in, JSON lines out."""

    def __init__(self, peer: Peer, folder: Path, threads: int = 1) -> None:
        why = peer.missing()
        if why:
            raise PeerError(why)
        self.peer = peer
        # the worker's stderr, for the error message; open while the worker lives
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        env = {
            **os.environ,
            # no network: the package and the hub stay offline (proxies at a closed port)
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "",
            "OMP_NUM_THREADS": str(threads),
            "PYTHONNOUSERSITE": "1",
        }
        env.pop("PYTHONPATH", None)
        self._process = subprocess.Popen(
            [str(peer.python), str(HERE / peer.worker), str(folder), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._log.seek(0)
            tail = self._log.read()[-3000:]
            code = self._process.returncode
            raise PeerError(f"{self.peer.method} worker exited ({code}): {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{self.peer.method}: {reply['error']}")
        return reply

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._process.pid

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()


def token_scores_attnlrp(
    process: PeerProcess, ids: Sequence[int], target: int, logit: float
) -> tuple[np.ndarray, float]:
    """(N,) AttnLRP relevance of each token for ``target``'s logit, and the worker's
    seconds; refuses when the worker's logit differs from ``logit`` (the local model's)."""
    reply = process.ask({"input_ids": list(ids), "target": int(target)})
    if abs(reply["logit"] - logit) > 1e-3 * max(1.0, abs(logit)):
        raise PeerError(
            f"attnlrp: the peer's model gives logit {reply['logit']:.5f}, the local one"
            f" {logit:.5f}: not the same model"
        )
    return np.asarray(reply["scores"], dtype=np.float64), float(reply["seconds"])


def token_scores_context_cite(
    process: PeerProcess,
    tokenizer: Any,
    prompt: str,
    ids: Sequence[int],
    sources: str,
    ablations: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N,) each token's ContextCite score: the score of the source (word or sentence) its
    characters fall in; the context is the prompt up to the end of the token before the
    last, the query the rest (the last token, which no method ranks). Also the worker's
    reply without the scores."""
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        raise PeerError("context-cite: the prompt does not tokenise to the scored ids")
    offsets = encoded["offset_mapping"]
    cut = offsets[-2][1]  # the end of the last ranked token: the context ends in no space
    reply = process.ask(
        {
            "context": prompt[:cut],
            "query": prompt[cut:],
            "sources": sources,
            "ablations": ablations,
            "seed": seed,
        }
    )
    if not reply["exact"]:
        raise PeerError("context-cite: its sources do not rebuild the prompt exactly")
    if reply["prompt_ids"] != list(ids):
        raise PeerError("context-cite: its prompt is not the scored ids")
    scores = np.zeros(len(ids))
    for position, (start, end) in enumerate(offsets[:-1]):
        overlaps = [
            (min(end, b) - max(start, a), k)
            for k, (a, b) in enumerate(reply["sources"])
            if min(end, b) > max(start, a)
        ]
        if overlaps:
            scores[position] = reply["scores"][max(overlaps)[1]]
    return scores, {k: v for k, v in reply.items() if k != "scores"}


@contextmanager
def started(
    names: Sequence[str], folder: Path, threads: int = 1
) -> Iterator[dict[str, PeerProcess]]:
    """The workers of the peers ``names`` on ``folder`` (a 4.x copy of its config), for
    the ``with`` block."""
    processes: dict[str, PeerProcess] = {}
    with tempfile.TemporaryDirectory(prefix="depass-peer-") as tmp:
        legacy = legacy_folder(folder, Path(tmp) / "model")
        try:
            for name in names:
                processes[name] = PeerProcess(PEERS[name], legacy, threads)
            yield processes
        finally:
            for process in processes.values():
                process.close()


def weights_folder(model: Any) -> Path:
    """The folder the evaluated model was loaded from (a ``.gguf``'s dequantised cache)."""
    folder = Path(model.model.name_or_path).resolve()
    if not (folder / "config.json").exists():
        raise PeerError(f"the peers need the model's folder; {folder} has no config.json")
    return folder


__all__ = ["PEERS", "Peer", "PeerError", "PeerProcess", "started", "weights_folder"]
