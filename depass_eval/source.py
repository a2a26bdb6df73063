"""Where DePass attributions come from: the engine in-process, or a service by URL.

Both sources answer the same few questions with numpy arrays, so the protocols never know
which one runs. The URL mode sends every DePass request to the service through the SDK
(``depass_client``); the baselines and the perturbed forwards still need the weights
(gradients are not served), so the same model is also loaded locally, and
:meth:`RemoteDePass.check_same_model` compares the two before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Split:
    """The DePass settings of a token run (the engine's defaults unless said)."""

    rule: str = "softmax"
    temperature: float = 0.1
    ignore_bos: bool = True
    # Score each token by its share of the answer's logit minus a competitor's (what sets
    # the answer apart), not of the answer's logit alone: ``runner-up`` (the model's next
    # most likely token) or ``other-name`` (the prompt's other name); None: no margin.
    margin: str | None = None

    @property
    def label(self) -> str:
        """Method name in tables and plots, e.g. ``depass-softmax`` or
        ``depass-softmax-T0.5-bos-margin``."""
        name = f"depass-{self.rule}"
        if self.rule == "softmax" and self.temperature != 0.1:
            name += f"-T{self.temperature:g}"
        if not self.ignore_bos:
            name += "-bos"
        if self.margin is not None:
            name += {"runner-up": "-margin", "other-name": "-margin-name"}[self.margin]
        return name


class DePassSource(Protocol):
    """The DePass questions the protocols ask."""

    def token_scores(
        self, ids: list[int], target: int, split: Split, against: int | None = None
    ) -> np.ndarray:
        """(N,) logit contribution of each input token to ``target`` at the last position
        (``against``: to the logit of ``target`` minus that of ``against``)."""
        ...

    def token_states(self, ids: list[int], end_layer: int, split: Split) -> np.ndarray:
        """(N, D) each input token's part of the residual entering ``end_layer`` at the
        last position."""
        ...

    def token_states_of_layers(
        self, ids: list[int], layers: list[int], split: Split
    ) -> dict[int, np.ndarray]:
        """{layer: (N, D)} each input token's part of the residual entering each of
        ``layers`` at the last position (one request)."""
        ...

    def head_scores(
        self, ids: list[int], target: int, layers: list[int], split: Split | None = None
    ) -> np.ndarray:
        """(len(layers), H) each head's contribution to ``target``'s logit (``split``:
        the DePass settings; None: the engine's defaults for head runs)."""
        ...

    def neuron_scores(
        self, ids: list[int], target: int, layer: int, split: Split | None = None
    ) -> np.ndarray:
        """(I,) each MLP neuron's (of ``layer``) contribution to ``target``'s logit."""
        ...

    def neuron_scores_of_layers(
        self, ids: list[int], target: int, layers: list[int], split: Split | None = None
    ) -> np.ndarray:
        """(len(layers), I) the neuron scores of each of ``layers``."""
        ...

    def subspace(
        self, ids: list[int], layer: int, parts: np.ndarray, target: int, end_layer: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Carry ``parts`` (K, N, D) of the residual entering ``layer`` to ``end_layer``
        (None: the output): (K, D) states and (K,) scores for ``target``, last position."""
        ...


def _request_fields(ids: list[int], **fields: Any) -> dict[str, Any]:
    return {"input_ids": ids, "positions": [-1], **fields}


def _split_fields(split: Split) -> dict[str, Any]:
    return {
        "mlp_split": split.rule,
        "temperature": split.temperature,
        "ignore_bos": split.ignore_bos,
    }


@dataclass
class _DePassCalls:
    """The questions of :class:`DePassSource` as attribution requests; subclasses say
    where a request goes (``_run``: the request's fields -> a result with numpy-readable
    ``scores``, ``states`` and ``logits``)."""

    calls: int = field(default=0, init=False)

    def _run(self, **fields: Any) -> Any:
        raise NotImplementedError

    def _ask(self, **fields: Any) -> Any:
        self.calls += 1
        return self._run(**fields)

    def token_scores(
        self, ids: list[int], target: int, split: Split, against: int | None = None
    ) -> np.ndarray:
        targets = [target] if against is None else [target, against]
        result = self._ask(**_request_fields(ids, targets=targets), **_split_fields(split))
        scores = np.asarray(result.scores)[0]  # (N, T): scores add up per target
        return scores[:, 0] if against is None else scores[:, 0] - scores[:, 1]

    def token_states(self, ids: list[int], end_layer: int, split: Split) -> np.ndarray:
        result = self._ask(
            **_request_fields(ids), end_layer=end_layer, outputs=["states"], **_split_fields(split)
        )
        return np.asarray(result.states)[0]

    def token_states_of_layers(
        self, ids: list[int], layers: list[int], split: Split
    ) -> dict[int, np.ndarray]:
        result = self._ask(
            **_request_fields(ids),
            end_layer=max(layers),
            all_layers=True,
            outputs=["states"],
            **_split_fields(split),
        )
        states, entering = np.asarray(result.states), list(result.layers)
        return {layer: states[entering.index(layer), 0] for layer in layers}

    def head_scores(
        self, ids: list[int], target: int, layers: list[int], split: Split | None = None
    ) -> np.ndarray:
        result = self._ask(
            **_request_fields(ids, targets=[target]),
            granularity="head",
            start_layer=layers,
            **(_split_fields(split) if split else {}),
        )
        return np.asarray(result.scores)[:, 0, 1:, 0]  # component 0 is the rest

    def neuron_scores(
        self, ids: list[int], target: int, layer: int, split: Split | None = None
    ) -> np.ndarray:
        result = self._ask(
            **_request_fields(ids, targets=[target]),
            granularity="neuron",
            start_layer=layer,
            **(_split_fields(split) if split else {}),
        )
        return np.asarray(result.scores)[0, 1:, 0]  # component 0 is the rest

    def neuron_scores_of_layers(
        self, ids: list[int], target: int, layers: list[int], split: Split | None = None
    ) -> np.ndarray:
        # One request for every layer; the engine's "auto" strategy answers it with one
        # backward pass for the taylor rule (reverse mode), or carries each layer's
        # neurons forward through the layers above it for the other rules (about L^2 / 2
        # layer steps: minutes per prompt for SmolLM2 on a CPU).
        result = self._ask(
            **_request_fields(ids, targets=[target]),
            granularity="neuron",
            start_layer=list(layers),
            **(_split_fields(split) if split else {}),
        )
        return np.asarray(result.scores)[:, 0, 1:, 0]  # component 0 is the rest

    def subspace(
        self, ids: list[int], layer: int, parts: np.ndarray, target: int, end_layer: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        result = self._ask(
            **_request_fields(ids, targets=[target]),
            granularity="subspace",
            start_layer=layer,
            end_layer=end_layer,
            subspace=parts.astype(np.float32),
            outputs=["states", "scores"],
        )
        return np.asarray(result.states)[0], np.asarray(result.scores)[0, :, 0]


@dataclass
class LocalDePass(_DePassCalls):
    """DePass from an in-process :class:`engine.DePassEngine`."""

    engine: Any = None

    def _run(self, **fields: Any) -> Any:
        from engine import AttributionRequest

        return self.engine.attribute(AttributionRequest(**fields))


@dataclass
class RemoteDePass(_DePassCalls):
    """DePass from a running service, through the SDK (``depass_client.Client``)."""

    client: Any = None

    def _run(self, **fields: Any) -> Any:
        return self.client.attribute(binary=True, **fields)

    def check_same_model(self, ids: list[int], logits: np.ndarray) -> None:
        """Refuse to run when the service's model is not the local one: the same prompt
        must give the same logit for the local top-1 token (to 1e-3 relative)."""
        top = int(np.argmax(logits))
        served = self._ask(**_request_fields(ids, targets=[top]))
        expected = float(logits[top])
        got = float(np.asarray(served.logits).reshape(-1)[0])
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            raise RuntimeError(
                f"the service's model differs from the local one: logit {got:.5f} there, "
                f"{expected:.5f} here; load the served weights with --model"
            )
