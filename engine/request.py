"""The attribution request the engine takes, checked as it is built.

A plain dataclass (the engine needs nothing beyond torch, transformers and numpy). It is
also the one schema of the HTTP body: each field's description and numeric floor live in
its ``metadata`` here, and ``POST /v1/attributions`` derives its pydantic body from this
class (``service.endpoints.attributions.protocol``).
Checks that need no model (types, ranges, conflicting fields, finite numbers) run at
construction; checks that need the model (layer and position ranges, vocabulary,
subspace shape) run in the engine. Both raise :class:`RequestError`, which names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, get_args

import numpy as np
import torch

from engine.errors import RequestError
from engine.granularity import GRANULARITY_KINDS
from engine.splits import SPLIT_RULES, SplitRule
from engine.tokens import check_one_input

#: The granularity names, from the registry (:data:`engine.granularity.GRANULARITY_KINDS`).
GRANULARITIES: tuple[str, ...] = tuple(GRANULARITY_KINDS)
#: A granularity name: the registry's names as a ``Literal`` (the HTTP schema's enum).
Granularity = Literal[GRANULARITIES]  # type: ignore[valid-type]
Output = Literal["scores", "states"]
Role = Literal["system", "user", "assistant"]
#: How the scores are computed: ``forward`` carries every component through the network;
#: ``reverse`` (``mlp_split='taylor'``, scores only) takes every component's score from one
#: gradient; ``auto`` picks reverse when it applies and costs less.
Strategy = Literal["auto", "forward", "reverse"]
#: The strategy a request runs with (``auto`` resolved).
RunStrategy = Literal["forward", "reverse"]
OUTPUTS: tuple[str, ...] = get_args(Output)
ROLES: tuple[str, ...] = get_args(Role)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
#: The inputs a request may give, exactly one of them.

#: The smallest MLP-split temperature accepted (the engine and the HTTP schema). The
#: float32 softmax split overflows near 1e-38; long before that it is the 'max' split.
MIN_TEMPERATURE = 1e-6


def _one_of(names: tuple[str, ...]) -> str:
    """``a, b or c``: a list of names in a description."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _about(description: str, minimum: float | None = None) -> dict[str, Any]:
    """A request field's ``metadata``: its meaning (the HTTP schema's description) and, for
    numeric fields, the least value every number in it may take (the schema's minimum)."""
    return {"description": description} | ({} if minimum is None else {"minimum": minimum})


def _is_int(value: Any) -> TypeGuard[int | np.integer]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_list(name: str, value: Any, minimum: int | None = None) -> list[int]:
    """``value`` as a list of ints (each at least ``minimum``), or a RequestError."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise RequestError(name, "must be a list of integers")
    items = list(value)
    if not all(_is_int(v) for v in items):
        raise RequestError(name, "must be a list of integers")
    if minimum is not None and any(v < minimum for v in items):
        raise RequestError(name, f"must hold integers of at least {minimum}")
    return [int(v) for v in items]


def check_messages(value: Any) -> list[dict[str, str]]:
    """``value`` as a chat: a non-empty list of ``{"role", "content"}`` with known roles."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise RequestError("messages", "must be a list of {'role', 'content'} objects")
    if not value:
        raise RequestError("messages", "must hold at least one message")
    chat = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise RequestError("messages", f"message {index} must have 'role' and 'content' only")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RequestError(
                "messages", f"message {index}: role must be one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise RequestError("messages", f"message {index}: content must be a string")
        chat.append({"role": role, "content": content})
    return chat


@dataclass
class AttributionRequest:
    """What to decompose, how, and what to return.

    Layer conventions: ``start_layer=s`` decomposes the residual entering layer ``s`` for
    token and subspace runs, and the parts of layer ``s`` for module, head and neuron
    runs; ``end_layer=e`` stops at the residual entering layer ``e`` (``None``: the model
    output, after the final norm).

    Each field's meaning is in its ``metadata['description']`` (the HTTP schema shows it).
    """

    prompt: str | None = field(
        default=None, metadata=_about("Text to attribute (or give input_ids or messages).")
    )
    input_ids: list[int] | None = field(
        default=None,
        metadata=_about(
            "Token ids to attribute (or give prompt or messages); used as given.", minimum=0
        ),
    )
    messages: list[dict[str, str]] | None = field(
        default=None,
        metadata=_about(
            "A chat (role/content list) to attribute, in the model's chat template "
            "with the generation prompt appended (or give prompt or input_ids)."
        ),
    )
    granularity: Granularity = field(
        default="token",
        metadata=_about(f"What the components are: {_one_of(GRANULARITIES)}."),
    )
    start_layer: int | list[int] = field(
        default=0,
        metadata=_about(
            "Layer to decompose; for head, neuron and module runs also a list of layers.", minimum=0
        ),
    )
    end_layer: int | None = field(
        default=None,
        metadata=_about("Stop at the residual entering this layer; None: model output.", minimum=0),
    )
    module: Literal["attn", "mlp"] | None = field(
        default=None,
        metadata=_about("Which module of start_layer (granularity='module'): attn or mlp."),
    )
    neurons: list[int] | None = field(
        default=None,
        metadata=_about(
            "MLP neurons of start_layer to keep apart (granularity='neuron'); None: "
            "every neuron of each layer.",
            minimum=0,
        ),
    )
    groups: list[list[int]] | None = field(
        default=None, metadata=_about("Token groups, each one component (granularity='token').")
    )
    subspace: Any = field(
        default=None, metadata=_about("(K, N, D) components of the residual entering start_layer.")
    )
    mlp_split: SplitRule = field(
        default="softmax", metadata=_about(f"MLP split rule: {_one_of(SPLIT_RULES)}.")
    )
    temperature: float = field(
        default=0.1,
        metadata=_about(
            f"Softmax temperature of the split (at least {MIN_TEMPERATURE:g}; "
            "below, use mlp_split='max').",
            minimum=MIN_TEMPERATURE,
        ),
    )
    ignore_bos: bool | None = field(
        default=None,
        metadata=_about(
            "First-token rule; None: on for token runs whose first token is a special "
            "token the tokenizer added (BOS, a chat template's), off otherwise. The result reports "
            "the value applied."
        ),
    )
    all_layers: bool = field(
        default=False,
        metadata=_about("Token runs: the decomposition entering every layer from start."),
    )
    targets: list[int | str] | None = field(
        default=None,
        metadata=_about(
            "Token ids or strings to score at every position; None: each returned "
            "position's own top-1 next token."
        ),
    )
    positions: list[int] | None = field(
        default=None,
        metadata=_about("Positions to return (negative counts from the end); None: all."),
    )
    outputs: list[Output] = field(
        default_factory=lambda: ["scores"], metadata=_about("'scores' and/or 'states'.")
    )
    strategy: Strategy = field(
        default="auto",
        metadata=_about(
            "auto, forward or reverse: reverse (mlp_split='taylor', scores only) "
            "gives every component's score from one gradient; auto picks it when it applies "
            "and costs less."
        ),
    )
    top_k: int | None = field(
        default=None,
        metadata=_about(
            "Keep only the k components with the largest |score| at each returned "
            "position and target (the union over them); None: every component.",
            minimum=1,
        ),
    )

    def __post_init__(self) -> None:
        self._check_values()
        self._check_consistency()

    # ------------------------------------------------------------------ checks

    def _check_values(self) -> None:
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestError("prompt", "must be a string")
        if self.input_ids is not None:
            self.input_ids = _int_list("input_ids", self.input_ids, minimum=0)
        if self.messages is not None:
            self.messages = check_messages(self.messages)
        if self.granularity not in GRANULARITIES:
            raise RequestError("granularity", f"must be one of {', '.join(GRANULARITIES)}")
        if _is_int(self.start_layer):
            if self.start_layer < 0:
                raise RequestError("start_layer", "must be at least 0")
            self.start_layer = int(self.start_layer)
        else:
            self.start_layer = _int_list("start_layer", self.start_layer, minimum=0)
        if self.end_layer is not None and (not _is_int(self.end_layer) or self.end_layer < 0):
            raise RequestError("end_layer", "must be an integer of at least 0, or null")
        if self.module not in (None, "attn", "mlp"):
            raise RequestError("module", "must be 'attn' or 'mlp'")
        if self.neurons is not None:
            self.neurons = _int_list("neurons", self.neurons, minimum=0)
        if self.groups is not None:
            self.groups = self._checked_groups(self.groups)
        if self.subspace is not None:
            self.subspace = self._subspace_array(self.subspace)
        if self.mlp_split not in SPLIT_RULES:
            raise RequestError("mlp_split", f"must be one of {', '.join(SPLIT_RULES)}")
        temperature = self.temperature
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or temperature < MIN_TEMPERATURE
        ):
            raise RequestError(
                "temperature", f"must be a finite number of at least {MIN_TEMPERATURE:g}"
            )
        self.temperature = float(temperature)
        if self.ignore_bos is not None and not isinstance(self.ignore_bos, bool):
            raise RequestError("ignore_bos", "must be true, false or null")
        if not isinstance(self.all_layers, bool):
            raise RequestError("all_layers", "must be true or false")
        if self.targets is not None:
            targets = list(self.targets) if isinstance(self.targets, (list, tuple)) else None
            if targets is None or not all(_is_int(t) or isinstance(t, str) for t in targets):
                raise RequestError("targets", "must be a list of token ids or strings")
            if any(_is_int(t) and t < 0 for t in targets):
                raise RequestError("targets", "token ids must be at least 0")
            if not targets:
                raise RequestError("targets", "must name at least one target (or be null)")
            self.targets = [int(t) if _is_int(t) else t for t in targets]
        if self.positions is not None:
            self.positions = _int_list("positions", self.positions)
        self.outputs = self._checked_outputs(self.outputs)
        if self.strategy not in STRATEGIES:
            raise RequestError("strategy", f"must be one of {', '.join(STRATEGIES)}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise RequestError("top_k", "must be an integer of at least 1, or null")

    @staticmethod
    def _checked_outputs(value: Any) -> list[Output]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RequestError("outputs", "must be a list of 'scores' and/or 'states'")
        if not value:
            raise RequestError("outputs", "must name at least one of 'scores', 'states'")
        unknown = [v for v in value if v not in OUTPUTS]
        if unknown:
            raise RequestError("outputs", f"{unknown[0]!r} is not one of 'scores', 'states'")
        return list(dict.fromkeys(value))

    @staticmethod
    def _checked_groups(value: Any) -> list[list[int]]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RequestError("groups", "must be a list of lists of positions")
        if not value:
            raise RequestError("groups", "must hold at least one group")
        groups = [_int_list("groups", group) for group in value]
        seen: set[int] = set()
        for index, group in enumerate(groups):
            if not group:
                raise RequestError("groups", f"group {index} is empty")
            if len(set(group)) != len(group) or seen & set(group):
                raise RequestError(
                    "groups", f"group {index} repeats a position; groups must be disjoint"
                )
            seen |= set(group)
        return groups

    @staticmethod
    def _subspace_array(value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            array = value.detach().to("cpu", torch.float32).numpy()
        else:
            try:
                array = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError):
                raise RequestError("subspace", "must be a numeric (K, N, D) array") from None
        if array.ndim != 3 or array.shape[0] < 1:
            raise RequestError(
                "subspace", f"must have shape (K, N, D) with K >= 1, got {array.shape}"
            )
        if not np.isfinite(array).all():
            raise RequestError("subspace", "must hold finite numbers only")
        return array

    def _check_consistency(self) -> None:
        check_one_input(self.prompt, self.input_ids, self.messages)
        if self.strategy == "reverse":
            why = self.reverse_refusal
            if why is not None:
                raise RequestError("strategy", f"'reverse' {why}; use 'forward' or 'auto'")
        if self.top_k is not None and "states" in self.outputs:
            raise RequestError("top_k", "selects scores; it cannot be combined with 'states'")
        kind = GRANULARITY_KINDS[self.granularity]
        if isinstance(self.start_layer, list):
            if not kind.several_layers:
                several = [k.name for k in GRANULARITY_KINDS.values() if k.several_layers]
                raise RequestError(
                    "start_layer", f"a list of layers is allowed for {', '.join(several)} runs only"
                )
            if not self.start_layer:
                raise RequestError("start_layer", "the list of layers is empty")
            repeated = [v for i, v in enumerate(self.start_layer) if v in self.start_layer[:i]]
            if repeated:
                raise RequestError(
                    "start_layer", f"lists layer {repeated[0]} twice; list each layer once"
                )
        for owner in GRANULARITY_KINDS.values():  # each field its granularity's alone
            for name in owner.fields:
                value = getattr(self, name)
                given = value is not None and value is not False
                if given and name not in kind.fields:
                    raise RequestError(name, f"only for granularity='{owner.name}'")
                if not given and name in kind.required:
                    raise RequestError(name, f"required for granularity='{kind.name}'")

    # ------------------------------------------------------------------ derived

    @property
    def start_layers(self) -> list[int]:
        """``start_layer`` as a list."""
        return list(self.start_layer) if isinstance(self.start_layer, list) else [self.start_layer]

    @property
    def reverse_refusal(self) -> str | None:
        """Why the reverse strategy cannot run this request (``None``: it can)."""
        if self.mlp_split != "taylor":
            return (
                f"needs mlp_split='taylor' ('{self.mlp_split}' splits each neuron by all "
                "components jointly, which has no reverse form)"
            )
        if "states" in self.outputs:
            return "gives scores only, not 'states'"
        if self.all_layers:
            return "gives the output's scores only, not all_layers"
        return None

    def applied_first_token_rule(self, starts_with_special: bool) -> bool:
        """Whether the first-token rule is on: ``ignore_bos`` when given, else on for the
        granularities whose default it is (token runs) when the prompt's first token is
        a special token the tokenizer added (a BOS, a chat template's marker), whose
        attention-sink share the rule exists for; off otherwise."""
        if self.ignore_bos is None:
            return GRANULARITY_KINDS[self.granularity].first_token_rule and starts_with_special
        return self.ignore_bos
