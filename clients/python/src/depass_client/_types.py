"""Typed results: attributions, generations, next tokens, tokenizations, the model card.

Results keep the engine's names, fields (``tokens``, ``components``, ``positions``,
``targets``, ``target_tokens``, ``conservation_error``, ``kept_top_k``) and methods
(:meth:`Attribution.top_components`, :meth:`Attribution.labels`, as
``engine.AttributionResult``'s), and hold numpy arrays. Their fields are the response
schemas' (a contract test holds them equal to the service's OpenAPI document). Unknown
response fields are ignored, so that an older SDK keeps working against a newer service.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from depass_client import _arrays, _safetensors

METADATA_KEY = "depass"
ResultT = TypeVar("ResultT", bound="_Result")


class _Result:
    """Shared (de)serialisation: JSON fields plus named numpy arrays."""

    ARRAYS: tuple[str, ...] = ()

    @classmethod
    def from_json(cls: type[ResultT], body: dict[str, Any]) -> ResultT:
        """Build from a JSON response body (array objects decoded)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in body.items() if k in names and k not in cls.ARRAYS}
        arrays = {k: _arrays.decode(body.get(k)) for k in cls.ARRAYS if k in names}
        return cls(**values, **arrays)

    @classmethod
    def from_safetensors_bytes(cls: type[ResultT], data: bytes) -> ResultT:
        """Build from a binary (safetensors) response or a saved file's bytes."""
        tensors, metadata = _safetensors.loads(data)
        fields = json.loads(metadata.get(METADATA_KEY, "{}"))
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in fields.items() if k in names and k not in cls.ARRAYS}
        arrays = {k: tensors.get(k) for k in cls.ARRAYS}
        return cls(**values, **arrays)

    @classmethod
    def from_safetensors(cls: type[ResultT], path: str | os.PathLike[str]) -> ResultT:
        """Load a result saved with :meth:`to_safetensors`."""
        return cls.from_safetensors_bytes(Path(path).read_bytes())

    def to_safetensors(self, path: str | os.PathLike[str]) -> None:
        """Save the arrays as tensors and the other fields as JSON metadata."""
        tensors = {k: v for k in self.ARRAYS if (v := getattr(self, k)) is not None}
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self.ARRAYS
        }
        metadata = {METADATA_KEY: json.dumps(fields)}
        Path(path).write_bytes(_safetensors.dumps(tensors, metadata))

    def to_dict(self) -> dict[str, Any]:
        """Every field, arrays as nested lists (for JSON)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out


@dataclass
class Attribution(_Result):
    """Components of the residual stream and their scores (see ``POST /v1/attributions``).

    Arrays (numpy, float32 or float16 as asked) carry a leading layer axis when
    ``layers`` is set:

    * ``scores``: ([layers,] P, M, T) logit contribution of each component;
    * ``remainder_scores``: ([layers,] P, T); ``logits``: ([layers,] P, T);
    * ``states``: ([layers,] P, M, D) and ``remainder``: ([layers,] P, D), when asked.

    Labels: ``components`` (M,) names the component axis; when the labels differ by
    layer (a list of head layers) they leave the layer out (``"H0"``) and
    ``layer_components[i]`` names layer ``layers[i]``'s (``"L3.H0"``); :meth:`labels`
    gives either. ``first_positions`` (M,) is where each component starts to exist (a
    later token is exactly 0 before it). Targets: ``position_targets`` (P, T) is what each
    position is scored on (by default its own top-1 next token); ``targets`` (T,) is the
    last returned position's.
    """

    ARRAYS = ("scores", "remainder_scores", "states", "remainder", "logits", "capped_logits")

    tokens: list[str]
    input_ids: list[int]
    components: list[str]
    positions: list[int]
    targets: list[int]
    target_tokens: list[str]
    layer_components: list[list[str]] | None = None
    first_positions: list[int] | None = None
    position_targets: list[list[int]] | None = None
    position_target_tokens: list[list[str]] | None = None
    granularity: str = "token"
    mlp_split: str = "softmax"
    end: str = "output"
    layers: list[int] | None = None
    conservation_error: float = 0.0
    relative_conservation_error: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    logit_softcap: float | None = None
    strategy: str = "forward"
    kept_top_k: int | None = None
    #: The first-token rule applied (the request's ``ignore_bos``, or the service's
    #: default for this prompt); None from a service that does not say.
    ignore_bos: bool | None = None
    scores: np.ndarray | None = None
    remainder_scores: np.ndarray | None = None
    states: np.ndarray | None = None
    remainder: np.ndarray | None = None
    logits: np.ndarray | None = None
    capped_logits: np.ndarray | None = None

    def score_row(self, position: int = -1, target: int = 0, layer: int = -1) -> np.ndarray:
        """(M,) every component's score at one index of the position, target and layer
        axes, in float64 (components absent at that position score exactly 0)."""
        if self.scores is None:
            raise ValueError("this result holds no scores; ask for outputs=['scores']")
        scores = self.scores if self.layers is None else self.scores[layer]
        return np.asarray(scores[position, :, target], dtype=np.float64)  # (M,)

    def labels(self, layer: int = -1) -> list[str]:
        """The component labels at index ``layer`` of the layer axis (``components`` when
        they are the same at every layer)."""
        return self.components if self.layer_components is None else self.layer_components[layer]

    def keep_top(self, k: int) -> Attribution:
        """This result with only the components among the ``k`` largest |score| of some
        position and target (and layer entry), in their original order, as the request's
        ``top_k`` and the engine's ``AttributionResult.keep_top`` keep them; the
        remainder, logits and conservation are unchanged."""
        if self.scores is None:
            raise ValueError("keep_top selects scores; this result holds none")
        scores = self.scores if self.layers is not None else self.scores[None]
        count = scores.shape[-2]
        if k < count:
            # (layers, P, M, T) -> every component index that is some entry's top-k
            top = np.argsort(-np.abs(scores), axis=-2, kind="stable")[..., :k, :]
            kept = np.unique(top)
        else:
            kept = np.arange(count)

        def pick(array: np.ndarray | None) -> np.ndarray | None:  # the M axis is -2
            return None if array is None else np.take(array, kept, axis=-2)

        return dataclasses.replace(
            self,
            components=[self.components[i] for i in kept],
            layer_components=None
            if self.layer_components is None
            else [[names[i] for i in kept] for names in self.layer_components],
            first_positions=None
            if self.first_positions is None
            else [self.first_positions[i] for i in kept],
            scores=pick(self.scores),
            states=pick(self.states),
            kept_top_k=k,
        )

    def present(self, position: int = -1) -> np.ndarray:
        """Indices of the components that exist at index ``position`` of ``positions``
        (every one when the service does not say)."""
        if self.first_positions is None:
            return np.arange(len(self.components))
        first = np.asarray(self.first_positions)
        return np.flatnonzero(first <= self.positions[position])

    def target(self, position: int = -1, target: int = 0) -> tuple[int, str]:
        """The token id and text scored at index ``position`` of ``positions``."""
        if self.position_targets is None or self.position_target_tokens is None:
            return self.targets[target], self.target_tokens[target]
        return self.position_targets[position][target], self.position_target_tokens[position][
            target
        ]

    def top_components(
        self, k: int = 10, position: int = -1, target: int = 0, layer: int = -1
    ) -> list[tuple[str, float]]:
        """The ``k`` components with the largest score; components that do not exist yet
        at that position (later tokens) are not ranked.

        Args:
            position: index into ``positions`` (-1: the last position returned).
            target: index into the target axis.
            layer: index into ``layers`` when the result has a layer axis.
        """
        row = self.score_row(position, target, layer)
        present = self.present(position)
        order = present[np.argsort(-row[present], kind="stable")[:k]]
        names = self.labels(layer)
        return [(names[i], float(row[i])) for i in order]

    def to_html(self, position: int = -1, target: int = 0, layer: int = -1) -> str:
        """A self-contained HTML page of the result (no scripts): the token heat map, the
        layer x head grid, or a ranked table (see :mod:`depass_client.views`)."""
        from depass_client.views import attribution_page

        return attribution_page(self, position, target, layer)

    def _repr_html_(self) -> str:
        """Jupyter's view: :meth:`to_html`'s content, as a fragment."""
        from depass_client.views import attribution_html

        return attribution_html(self)

    def table(self, k: int = 10, position: int = -1, target: int = 0, layer: int = -1) -> str:
        """A plain-text table of the top ``k`` components, with bars."""
        top = self.top_components(k, position, target, layer)
        pos = self.positions[position]
        target_id, target_text = self.target(position, target)
        head = f"target {target_text!r} (id {target_id}) at position {pos} {self.tokens[pos]!r}"
        if self.layers is not None:
            head += f", layer {self.layers[layer]}"
        if self.logits is not None:
            logits = self.logits if self.layers is None else self.logits[layer]
            head += f", logit {float(logits[position, target]):.4f}"
        rows = list(top)
        if self.remainder_scores is not None:
            rem = self.remainder_scores if self.layers is None else self.remainder_scores[layer]
            rows.append(("remainder", float(rem[position, target])))
        lines = [head, *_score_lines(rows, ranked=len(top))]
        lines.append(f"conservation error {self.conservation_error:.2e}")
        return "\n".join(lines)


@dataclass
class Generation(_Result):
    """A continuation and, for each generated token, its attribution (``POST /v1/generate``).

    ``scores`` is (G, M): row ``i`` scores the tokens before generated token ``i``
    (``components``: the prompt and the generated tokens but the last) on that token's
    logit; ``remainder_scores`` and ``logits`` are (G,).
    """

    ARRAYS = ("scores", "remainder_scores", "logits")

    text: str
    finish_reason: str
    prompt_ids: list[int]
    prompt_tokens: list[str]
    generated_ids: list[int]
    generated_tokens: list[str]
    components: list[str]
    positions: list[int]
    seed: int | None = None
    conservation_error: float = 0.0
    relative_conservation_error: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    scores: np.ndarray | None = None
    remainder_scores: np.ndarray | None = None
    logits: np.ndarray | None = None

    def top_components(self, k: int = 10, index: int = 0) -> list[tuple[str, float]]:
        """The ``k`` tokens that contributed most to generated token ``index``."""
        if self.scores is None:
            raise ValueError("this result holds no scores")
        row = np.asarray(self.scores[index], dtype=np.float64)  # (M,)
        order = np.argsort(-row, kind="stable")[:k]
        return [(self.components[i], float(row[i])) for i in order]

    def table(self, k: int = 5) -> str:
        """For each generated token, its top ``k`` contributors."""
        lines = [f"{self.text!r} ({self.finish_reason})"]
        for i, token in enumerate(self.generated_tokens):
            lines.append(f"[{i}] {token!r}")
            lines.extend("  " + line for line in _score_lines(self.top_components(k, i), ranked=k))
        return "\n".join(lines)


@dataclass
class NextToken:
    """One candidate next token (send its ``id`` as an attribution target)."""

    id: int
    token: str
    logit: float
    probability: float


@dataclass
class NextTokens:
    """The most likely next tokens after each asked position (``POST /v1/next_tokens``).

    ``predictions[i]`` holds the candidates after ``positions[i]``, most likely first;
    ``probability`` is the softmax of the logits over the whole vocabulary.
    """

    tokens: list[str]
    input_ids: list[int]
    positions: list[int]
    predictions: list[list[NextToken]]
    model: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> NextTokens:
        """Build from a JSON response body (unknown fields ignored)."""
        names = {f.name for f in dataclasses.fields(NextToken)}
        predictions = [
            [NextToken(**{k: v for k, v in c.items() if k in names}) for c in candidates]
            for candidates in body["predictions"]
        ]
        return cls(
            body["tokens"], body["input_ids"], body["positions"], predictions, body.get("model", "")
        )

    def table(self) -> str:
        """For each position, its candidates with their probability and logit."""
        lines = []
        for position, candidates in zip(self.positions, self.predictions, strict=True):
            lines.append(f"after position {position} {self.tokens[position]!r}")
            width = max((len(repr(c.token)) for c in candidates), default=5)
            lines.append(
                f"{'rank':>4}  {'token':<{width}}  {'id':>8}  {'probability':>11}  {'logit':>10}"
            )
            for rank, c in enumerate(candidates, 1):
                lines.append(
                    f"{rank:>4}  {c.token!r:<{width}}  {c.id:>8}  {c.probability:>11.4g}"
                    f"  {c.logit:>10.4f}"
                )
        return "\n".join(lines)


@dataclass
class Tokenization:
    """Token ids and texts of a prompt, special tokens included."""

    input_ids: list[int]
    tokens: list[str]
    num_tokens: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Tokenization:
        return cls(body["input_ids"], body["tokens"], body["num_tokens"])


@dataclass
class ModelCard:
    """The loaded model's facts and the service's limits (``GET /v1/model``)."""

    id: str
    architecture: str
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    device: str
    logit_softcap: float | None = None
    compute_dtype: str = "float32"
    granularities: list[str] = field(default_factory=list)
    mlp_splits: list[str] = field(default_factory=list)
    array_encodings: list[str] = field(default_factory=list)
    auth_required: bool = False
    limits: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelCard:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})


def _score_lines(rows: list[tuple[str, float]], ranked: int, width: int = 24) -> list[str]:
    """Aligned ``rank  label  score  bar`` lines; bars scale with the largest |score|."""
    if not rows:
        return []
    label_width = max(9, *(len(label) for label, _ in rows))
    largest = max(abs(score) for _, score in rows) or 1.0
    lines = [f"{'rank':>4}  {'component':<{label_width}}  {'score':>10}"]
    for i, (label, score) in enumerate(rows):
        rank = str(i + 1) if i < ranked else ""
        bar = ("█" if score >= 0 else "░") * round(width * abs(score) / largest)
        lines.append(f"{rank:>4}  {label:<{label_width}}  {score:>10.4f}  {bar}")
    return lines
