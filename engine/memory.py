"""How much memory a decomposition needs, estimated from shapes before any model work.

The engine promises that a request uses at most its working budget beyond the model's
weights: it sizes the request here, refuses it (:class:`MemoryBudgetError`) when even the
smallest chunks would not fit, and otherwise gives the chunked parts of the work
(attention blocks of components, MLP chunks of positions) what the fixed parts leave.

Every term is an upper bound of what the code allocates at once (the tests compare the
total with the measured peak on the CPU):

- ``trace``: the forward pass's frozen quantities (engine/capture.py) and the pass's own
  transient memory (eager attention scores in float32);
- ``components``: the (M + 1, R, N, D) components, plus their start while a batch is
  gathered;
- ``frozen_layer``: one layer's scales, probabilities and activations in the compute
  dtypes, and its weights when the matmul dtype differs from the model's;
- ``snapshots``: the kept states and what the result is built from;
- ``working``: the largest chunk of attention or MLP work, within what the budget leaves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.errors import RequestError
from engine.info import ModelInfo

if TYPE_CHECKING:
    from torch import nn

    from engine.families import Family

GiB = 1024**3

#: What an automatic budget leaves free on a GPU (CUDA context, allocator slack, the
#: forward pass's own temporaries beyond the estimate).
GPU_RESERVE_BYTES = 2 * GiB
#: Share of the available host memory an automatic budget takes on the CPU.
CPU_SHARE = 0.5
#: The budget when nothing can be measured.
FALLBACK_BUDGET_BYTES = 2 * GiB


class MemoryBudgetError(RequestError):
    """The request needs more memory than the engine's working budget (HTTP 413)."""

    def __init__(self, field: str, estimate: MemoryEstimate, budget_bytes: int) -> None:
        super().__init__(
            field,
            f"needs an estimated {_gib(estimate.total)} of working memory "
            f"({estimate.describe()}), over this engine's budget of {_gib(budget_bytes)}; "
            "send fewer tokens, components, positions or layers",
        )
        self.estimate = estimate
        self.budget_bytes = budget_bytes


@dataclass(frozen=True)
class Shape:
    """The model facts the estimate needs, and element sizes in bytes."""

    model: ModelInfo
    model_bytes: int  # per element of the weights (and of the trace)
    compute_bytes: int  # per element of the components
    matmul_bytes: int  # per element of the matrix-product operands
    # What the family's parts add (engine/families/base.py): norms per layer (a frozen
    # (N, D) scale each, an (N, 1) one in the trace), post-norms (an (N, D) bias term
    # each), and (.., D) temporaries per row and position in attention blocks and MLP
    # chunks. The defaults are Llama's.
    frozen_norms: int = 2
    post_norms: int = 0
    attention_temporaries: int = 0
    mlp_temporaries: int = 0
    parallel: bool = False  # parallel layers keep a copy of the components entering them
    # The MLP's widest run of neurons one projection pair serves (what an MLP chunk
    # computes at once: a mixture's one expert), and the per-position width of its trace
    # (a mixture keeps only the chosen experts'); ``None``: the MLP width.
    split_width: int | None = None
    trace_width: int | None = None

    @classmethod
    def of(
        cls,
        info: ModelInfo,
        family: Family,
        model: nn.Module,
        compute_dtype: torch.dtype,
        matmul_dtype: torch.dtype,
    ) -> Shape:
        """The shape of ``model`` (facts ``info``) as its family's parts lay it out."""
        size = lambda dtype: torch.finfo(dtype).bits // 8  # noqa: E731
        mlps = [(layer, family.mlp.for_layer(layer)) for layer in family.decoder_layers(model)]
        return cls(
            model=info,
            model_bytes=size(getattr(torch, info.dtype)),
            compute_bytes=size(compute_dtype),
            matmul_bytes=size(matmul_dtype),
            frozen_norms=family.frozen_norms,
            post_norms=family.post_norms,
            attention_temporaries=family.attention_temporaries,
            mlp_temporaries=family.mlp_temporaries,
            parallel=family.parallel,
            split_width=max(part.split_width(layer) for layer, part in mlps),
            trace_width=max(part.trace_width(layer) for layer, part in mlps),
        )

    @property
    def split(self) -> int:
        return self.split_width or self.model.intermediate_size

    @property
    def traced(self) -> int:
        return self.trace_width or self.model.intermediate_size

    @property
    def layer_weight_elements(self) -> int:
        """Elements of the four matrices one layer's propagation reads."""
        m = self.model
        d, i = m.hidden_size, m.intermediate_size
        return d * (m.num_kv_heads * m.head_dim + m.num_heads * m.head_dim + 2 * i)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a decomposition holds at its peak, by part."""

    trace: int
    components: int
    frozen_layer: int
    snapshots: int
    working: int
    working_min: int = 0  # the smallest chunked work (one row, one position): not in total

    @property
    def total(self) -> int:
        return self.trace + self.components + self.frozen_layer + self.snapshots + self.working

    def describe(self) -> str:
        parts = ("trace", "components", "frozen_layer", "snapshots", "working")
        return ", ".join(f"{name.replace('_', ' ')} {_gib(getattr(self, name))}" for name in parts)


def trace_bytes(shape: Shape, length: int) -> int:
    """Bytes of one forward trace (engine/capture.py) of a ``length``-token prompt."""
    n, d, i = length, shape.model.hidden_size, shape.traced
    per_layer = 2 * n * d + shape.model.num_heads * n * n + 2 * n * i  # pre, mid, probs, gate, act
    # + h^L, its norm and the last logits before and after any cap
    elements = shape.model.num_layers * per_layer + 2 * n * d + 2 * shape.model.vocab_size
    scales = shape.model.num_layers * shape.frozen_norms * n * 4  # float32 (N, 1) per norm
    return elements * shape.model_bytes + scales + 8 * n  # + the int64 input ids


def forward_transient_bytes(shape: Shape, length: int) -> int:
    """Memory the ordinary forward pass allocates and frees (one layer's float32 attention
    scores, softmax and cast, and its MLP intermediates)."""
    n = length
    return 3 * shape.model.num_heads * n * n * 4 + 4 * n * shape.traced * 4


def attention_row_bytes(
    hidden: int,
    kv_width: int,
    head_width: int,
    members: int,
    length: int,
    element: int,
    temporaries: int = 0,
) -> int:
    """Working bytes of one component row of an attention block, over ``length`` positions
    of ``members`` prompts: the normalised input, values, contexts (and their permuted
    copies), the output, and ``temporaries`` more hidden-wide tensors (the parts')."""
    width = (3 + temporaries) * hidden + 2 * kv_width + 2 * head_width
    return members * length * element * width


def mlp_position_bytes(
    hidden: int,
    intermediate: int,
    rows: int,
    members: int,
    element: int,
    mixed: bool,
    temporaries: int = 0,
) -> int:
    """Working bytes of one position of an MLP chunk over ``rows`` components of
    ``members`` prompts: the scaled input and the output (``element`` bytes each), the
    float32 gates, their mask and the shares, and (``mixed``: a matmul dtype other than
    the compute dtype) the casts, and ``temporaries`` more hidden-wide tensors (the
    parts')."""
    if mixed:
        width = (3 + temporaries) * hidden * element + 3 * intermediate * 4
    else:
        width = (2 + temporaries) * hidden * element + 5 * intermediate * 4 // 2
    return rows * members * width


def causal_block(length: int) -> int:
    """Rows per attention block and positions per MLP chunk when components start at
    different positions: small enough that causal skipping pays, big enough to keep the
    matrix products efficient."""
    return max(8, -(-length // 8))


def attention_block(row_bytes: int, probs_bytes: int, budget_bytes: int, length: int) -> int:
    """Component rows per attention block: what the budget holds beside one copy of the
    block's probabilities, at most :func:`causal_block`, at least one."""
    room = budget_bytes - probs_bytes
    return max(1, min(room // max(1, row_bytes), causal_block(length)))


def mlp_chunk(position_bytes: int, budget_bytes: int, length: int, late_starts: bool) -> int:
    """Positions per MLP chunk: what the budget holds, at most :func:`causal_block` when
    components start late (``late_starts``), at least one."""
    chunk = max(1, min(budget_bytes // max(1, position_bytes), length))
    return min(chunk, causal_block(length)) if late_starts else chunk


def estimate(
    shape: Shape,
    *,
    rows: int,
    length: int,
    positions: int,
    snapshots: int,
    targets: int,
    members: int = 1,
    start_extra: int = 0,
    late_starts: bool = False,
    budget_bytes: int,
) -> tuple[MemoryEstimate, int]:
    """The estimate of one run (``members`` prompts padded to ``length`` tokens, ``rows``
    = M + 1 components) and the budget left for its chunks.

    Returns:
        (estimate, chunk_budget): ``chunk_budget`` is what the attention blocks and MLP
        chunks may use; the estimate's ``working`` is what they will use at most.
    ``start_extra``: bytes a start builder holds beside the components (per prompt);
    ``late_starts``: components start at different positions (token runs), which caps
    the chunks at :func:`causal_block`.
    """
    c, n, d = shape.compute_bytes, length, shape.model.hidden_size
    trace = members * (trace_bytes(shape, n) + forward_transient_bytes(shape, n))
    values = rows * members * n * d * c
    copies = 1 + (members > 1) + shape.parallel  # a batch's gathered start, a layer's input
    components = copies * values + members * start_extra
    probs = members * shape.model.num_heads * n * n * shape.matmul_bytes
    # scales in the compute dtype, activations and gates in float32 (the split's dtype)
    norms = (shape.frozen_norms + shape.post_norms) * members * n * d * c  # scales, bias terms
    frozen = norms + 2 * members * n * shape.model.intermediate_size * 4 + probs
    if shape.matmul_bytes != shape.model_bytes:
        frozen += shape.layer_weight_elements * shape.matmul_bytes
    # snapshots kept, and the result built from them: the views' lensed states and the
    # stacked result (the snapshots' totals too)
    kept = snapshots * rows * positions * (d + targets) * c
    snaps = 3 * kept * members + snapshots * members * n * d * c
    fixed = trace + components + frozen + snaps
    chunk_budget = max(0, budget_bytes - fixed)
    row = attention_row_bytes(
        d,
        shape.model.num_kv_heads * shape.model.head_dim,
        shape.model.num_heads * shape.model.head_dim,
        members,
        n,
        c,
        shape.attention_temporaries,
    )
    block = min(rows, attention_block(row, probs, chunk_budget, n))
    mixed = shape.matmul_bytes != shape.compute_bytes
    position = mlp_position_bytes(d, shape.split, rows, members, c, mixed, shape.mlp_temporaries)
    chunk = mlp_chunk(position, chunk_budget, n, late_starts)
    working = max(block * row + probs, chunk * position)
    attention_min, mlp_min = row + probs, position
    parts = MemoryEstimate(
        trace=trace,
        components=components,
        frozen_layer=frozen,
        snapshots=snaps,
        working=working,
        working_min=max(attention_min, mlp_min),
    )
    return parts, chunk_budget


def auto_budget_bytes(devices: Iterable[torch.device]) -> int:
    """A working budget from what is free now (call it once the weights are loaded).

    CUDA: the least free memory over the model's GPUs less ``GPU_RESERVE_BYTES`` (the
    working set lives on the GPU of the layer being decomposed); CPU: ``CPU_SHARE`` of the
    available physical memory. At least 256 MiB.
    """
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    if cuda:
        free = min(torch.cuda.mem_get_info(index)[0] for index in cuda)
        budget = free - GPU_RESERVE_BYTES
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = int(CPU_SHARE * available)
        except (ValueError, OSError, AttributeError):
            budget = FALLBACK_BUDGET_BYTES
    return max(budget, 256 * 1024**2)


def _gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB / 100 else f"{value / 1024**2:.1f} MiB"


def reverse_estimate(
    shape: Shape,
    *,
    length: int,
    stages: int,
    kept_stages: int,
    scored: int,
    start_rows: int,
    result_rows: int,
    positions: int,
    targets: int,
    runs: int,
    light_trace: bool = False,
) -> MemoryEstimate:
    """The memory of a reverse-strategy request (:mod:`engine.reverse`).

    Args:
        stages: stages the frozen pass runs (each keeps what its backward reads).
        kept_stages: stages whose (K, N, D) gradient is kept (the runs' starts).
        scored: K, the scored (position, target) logits (one cotangent each).
        start_rows: rows (M + 1) of the largest start one run builds (its components,
            or for neurons the (K, N, I) gradient at the down-projection input).
        result_rows: M + 1 of one run's result.
        runs: start layers (each leaves a (P, M + 1, T) view).
        light_trace: the trace keeps no attention probabilities (each layer's are
            recomputed when needed: one layer's more at a time).
    """
    m, c, n, d = shape.model, shape.compute_bytes, length, shape.model.hidden_size
    trace = trace_bytes(shape, n) + forward_transient_bytes(shape, n)
    if light_trace:
        trace -= (m.num_layers - 1) * m.num_heads * n * n * shape.model_bytes
    kv, heads = m.num_kv_heads * m.head_dim, m.num_heads * m.head_dim
    # per layer, what its backward reads: the states, the attention's normalised input,
    # values and contexts; the MLP's normalised input and frozen a / g (float32), and the
    # split's temporaries of the layer being built; the norms' frozen scales
    per_layer = n * c * (4 * d + 2 * kv + heads) + 2 * n * 4 * shape.split
    norms = (shape.frozen_norms + shape.post_norms) * n * d * c
    graph = (stages + 1) // 2 * (per_layer + norms)
    # the gradients kept, and those one backward step holds at once
    gradients = scored * n * d * c * (kept_stages + 4)
    start = max(start_rows * n * d * c, scored * n * shape.model.intermediate_size * 4 * 2)
    result = runs * positions * result_rows * targets * c * 3
    frozen = 2 * n * shape.model.intermediate_size * 4 + m.num_heads * n * n * shape.matmul_bytes
    return MemoryEstimate(
        trace=trace,
        components=start,
        frozen_layer=frozen + graph,
        snapshots=result,
        working=gradients,
    )
