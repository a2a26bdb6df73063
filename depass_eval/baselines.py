"""Token-importance baselines: attention (last layer, mean of layers, rollout) and the
gradient and perturbation methods of Captum (integrated gradients, signed gradient x
input, gradient norm, leave-one-out occlusion).

Every method scores the input tokens of one prompt for one target token at the last
position; larger means more important. The gradient and perturbation methods explain the
target's logit (what DePass decomposes) under the strict rules, or its log-probability
(what the paper's scripts differentiate) under the paper's, with respect to the token
embeddings. Integrated gradients uses 16 Gauss-Legendre steps (strict) or the paper's
100-step Riemann sum (``riemann_right``: the points k/100, k = 1..100), its steps batched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from depass_eval.model import EvalModel

#: Integrated-gradients steps (Gauss-Legendre, all in one batch): few, for the CPU.
DEFAULT_IG_STEPS = 16
#: The paper's integrated gradients: 100 steps of a Riemann sum from a zero embedding.
PAPER_IG_STEPS = 100
PAPER_IG_METHOD = "riemann_right"
#: Token positions (steps x prompt length) of one integrated-gradients batch.
IG_BATCH_TOKENS = 2048
#: What the gradient methods differentiate: the target's logit or its log-probability.
OBJECTIVES = ("logit", "log-prob")

ATTENTION_METHODS = ("attention-last", "attention-mean", "attention-rollout")
GRADIENT_METHODS = ("integrated-gradients", "gradient-x-input", "gradient-norm")
PERTURBATION_METHODS = ("leave-one-out",)
BASELINES = ATTENTION_METHODS + GRADIENT_METHODS + PERTURBATION_METHODS
#: The baselines of the paper's token experiments (no occlusion).
PAPER_BASELINES = ATTENTION_METHODS + GRADIENT_METHODS


def attention_scores(model: EvalModel, ids: list[int]) -> dict[str, np.ndarray]:
    """Attention of the last position to every token: last layer, mean over all layers
    (heads averaged), and rollout (Abnar & Zuidema 2020: ``0.5 A + 0.5 I`` per layer,
    rows renormalised, multiplied from the first layer up)."""
    with torch.inference_mode():
        batch = torch.tensor([ids], device=model.device)
        out = model.model(input_ids=batch, output_attentions=True, logits_to_keep=1)
    layers = torch.stack([a[0].float().mean(0) for a in out.attentions]).cpu()  # (L, N, N)
    eye = torch.eye(len(ids))
    rollout = eye
    for attention in layers:
        mixed = 0.5 * attention + 0.5 * eye
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return {
        "attention-last": layers[-1, -1].numpy(),
        "attention-mean": layers[:, -1].mean(0).numpy(),
        "attention-rollout": rollout[-1].numpy(),
    }


def _logit_of(
    model: EvalModel, target: int, objective: str = "logit"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Captum forward function: token embeddings (B, N, D) -> the target's logit or
    log-probability (B,)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        logits = model.model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1].float()
        if objective == "log-prob":
            return torch.log_softmax(logits, dim=-1)[:, target]
        return logits[:, target]

    return forward


def _embeddings(model: EvalModel, ids: list[int]) -> torch.Tensor:
    embed = model.embeddings()
    with torch.no_grad():
        return embed(torch.tensor([ids], device=model.device)).detach()


def integrated_gradients(
    model: EvalModel, ids: list[int], target: int, steps: int = DEFAULT_IG_STEPS
) -> np.ndarray:
    """Integrated gradients (Captum), zero-embedding baseline, ``steps`` Gauss-Legendre
    steps in one batch; summed over the embedding."""
    attr, _delta = integrated_gradients_with_delta(model, ids, target, steps)
    return attr


def integrated_gradients_with_delta(
    model: EvalModel,
    ids: list[int],
    target: int,
    steps: int = DEFAULT_IG_STEPS,
    objective: str = "logit",
    method: str = "gausslegendre",
) -> tuple[np.ndarray, float]:
    """Integrated gradients and its completeness error (Captum's convergence delta:
    the attributions' sum minus the objective's change from the baseline). The steps
    run in batches of about :data:`IG_BATCH_TOKENS` token positions."""
    from captum.attr import IntegratedGradients

    embeds = _embeddings(model, ids).requires_grad_(True)
    attr, delta = IntegratedGradients(_logit_of(model, target, objective)).attribute(
        embeds,
        baselines=torch.zeros_like(embeds),
        n_steps=steps,
        method=method,
        internal_batch_size=max(1, min(steps, IG_BATCH_TOKENS // len(ids))),
        return_convergence_delta=True,
    )
    return attr[0].sum(-1).detach().cpu().numpy(), float(delta.abs().max())


def gradient_x_input(
    model: EvalModel, ids: list[int], target: int, objective: str = "logit"
) -> np.ndarray:
    """Signed gradient x input (Captum ``InputXGradient``), summed over the embedding."""
    from captum.attr import InputXGradient

    embeds = _embeddings(model, ids).requires_grad_(True)
    attr = InputXGradient(_logit_of(model, target, objective)).attribute(embeds)
    return attr[0].sum(-1).detach().cpu().numpy()


def gradient_norm(
    model: EvalModel, ids: list[int], target: int, objective: str = "logit"
) -> np.ndarray:
    """L2 norm of the gradient at each token's embedding (Captum ``Saliency``)."""
    from captum.attr import Saliency

    embeds = _embeddings(model, ids).requires_grad_(True)
    grad = Saliency(_logit_of(model, target, objective)).attribute(embeds, abs=False)
    return grad[0].norm(dim=-1).detach().cpu().numpy()


def leave_one_out(model: EvalModel, ids: list[int], target: int) -> np.ndarray:
    """Leave-one-out occlusion (Captum ``FeatureAblation``): the target logit's drop when
    one token's embedding is zeroed, all tokens in one batch."""
    from captum.attr import FeatureAblation

    embeds = _embeddings(model, ids)
    n = len(ids)
    mask = torch.arange(n, device=embeds.device).view(1, n, 1).expand_as(embeds)
    with torch.no_grad():
        scores = FeatureAblation(_logit_of(model, target)).attribute(
            embeds, baselines=0.0, feature_mask=mask, perturbations_per_eval=n
        )
    return scores[0, :, 0].cpu().numpy()


@dataclass(frozen=True)
class GradientSettings:
    """What the gradient baselines differentiate and how integrated gradients sums:
    :meth:`strict` (the logit, 16 Gauss-Legendre steps) or :meth:`paper` (the
    log-probability, a 100-step Riemann sum)."""

    objective: str = "logit"
    ig_steps: int = DEFAULT_IG_STEPS
    ig_method: str = "gausslegendre"

    @classmethod
    def for_rules(cls, rules: str, ig_steps: int | None = None) -> GradientSettings:
        if rules == "paper":
            return cls("log-prob", ig_steps or PAPER_IG_STEPS, PAPER_IG_METHOD)
        return cls("logit", ig_steps or DEFAULT_IG_STEPS, "gausslegendre")


def baseline_scores(
    model: EvalModel,
    ids: list[int],
    target: int,
    ig_steps: int = DEFAULT_IG_STEPS,
    wanted: Sequence[str] = BASELINES,
    settings: GradientSettings | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], float | None]:
    """The ``wanted`` baselines' token scores, their seconds on this prompt (the three
    attention readings share one forward pass, whose time each of them is given), and
    integrated gradients' completeness error (None when it did not run)."""
    settings = settings or GradientSettings(ig_steps=ig_steps)
    objective = settings.objective
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    delta = None
    if set(wanted) & set(ATTENTION_METHODS):
        clock = time.perf_counter()
        scores.update(attention_scores(model, ids))
        seconds.update(dict.fromkeys(ATTENTION_METHODS, time.perf_counter() - clock))
    if "integrated-gradients" in wanted:
        clock = time.perf_counter()
        scores["integrated-gradients"], delta = integrated_gradients_with_delta(
            model, ids, target, settings.ig_steps, objective, settings.ig_method
        )
        seconds["integrated-gradients"] = time.perf_counter() - clock
    runs: dict[str, Callable[[], np.ndarray]] = {
        "gradient-x-input": lambda: gradient_x_input(model, ids, target, objective),
        "gradient-norm": lambda: gradient_norm(model, ids, target, objective),
        "leave-one-out": lambda: leave_one_out(model, ids, target),
    }
    for name, run in runs.items():
        if name not in wanted:
            continue
        clock = time.perf_counter()
        scores[name] = run()
        seconds[name] = time.perf_counter() - clock
    return scores, seconds, delta
