"""Token-importance baselines: attention (last layer, mean of layers, rollout) and the
gradient and perturbation methods of Captum (integrated gradients, signed gradient x
input, gradient norm, leave-one-out occlusion).

Every method scores the input tokens of one prompt for one target token at the last
position; larger means more important. The gradient and perturbation methods explain the
target's logit (what DePass decomposes), with respect to the token embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from depass_eval.model import EvalModel

#: Integrated-gradients steps (Gauss-Legendre, all in one batch): few, for the CPU.
DEFAULT_IG_STEPS = 16

ATTENTION_METHODS = ("attention-last", "attention-mean", "attention-rollout")
GRADIENT_METHODS = ("integrated-gradients", "gradient-x-input", "gradient-norm")
PERTURBATION_METHODS = ("leave-one-out",)
BASELINES = ATTENTION_METHODS + GRADIENT_METHODS + PERTURBATION_METHODS


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


def _logit_of(model: EvalModel, target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Captum forward function: token embeddings (B, N, D) -> the target's logit (B,)."""

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        return model.model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1, target]

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
    model: EvalModel, ids: list[int], target: int, steps: int = DEFAULT_IG_STEPS
) -> tuple[np.ndarray, float]:
    """Integrated gradients and its completeness error (Captum's convergence delta:
    the attributions' sum minus the logit's change from the baseline)."""
    from captum.attr import IntegratedGradients

    embeds = _embeddings(model, ids).requires_grad_(True)
    attr, delta = IntegratedGradients(_logit_of(model, target)).attribute(
        embeds,
        baselines=torch.zeros_like(embeds),
        n_steps=steps,
        internal_batch_size=steps,
        return_convergence_delta=True,
    )
    return attr[0].sum(-1).detach().cpu().numpy(), float(delta.abs().max())


def gradient_x_input(model: EvalModel, ids: list[int], target: int) -> np.ndarray:
    """Signed gradient x input (Captum ``InputXGradient``), summed over the embedding."""
    from captum.attr import InputXGradient

    embeds = _embeddings(model, ids).requires_grad_(True)
    attr = InputXGradient(_logit_of(model, target)).attribute(embeds)
    return attr[0].sum(-1).detach().cpu().numpy()


def gradient_norm(model: EvalModel, ids: list[int], target: int) -> np.ndarray:
    """L2 norm of the gradient at each token's embedding (Captum ``Saliency``)."""
    from captum.attr import Saliency

    embeds = _embeddings(model, ids).requires_grad_(True)
    grad = Saliency(_logit_of(model, target)).attribute(embeds, abs=False)
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


def baseline_scores(
    model: EvalModel, ids: list[int], target: int, ig_steps: int = DEFAULT_IG_STEPS
) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """Every baseline's token scores, its seconds on this prompt (the three attention
    readings share one forward pass, whose time each of them is given), and integrated
    gradients' completeness error."""
    clock = time.perf_counter()
    scores = attention_scores(model, ids)
    seconds = dict.fromkeys(ATTENTION_METHODS, time.perf_counter() - clock)
    clock = time.perf_counter()
    scores["integrated-gradients"], delta = integrated_gradients_with_delta(
        model, ids, target, ig_steps
    )
    seconds["integrated-gradients"] = time.perf_counter() - clock
    runs: dict[str, Callable[[], np.ndarray]] = {
        "gradient-x-input": lambda: gradient_x_input(model, ids, target),
        "gradient-norm": lambda: gradient_norm(model, ids, target),
        "leave-one-out": lambda: leave_one_out(model, ids, target),
    }
    for name, run in runs.items():
        clock = time.perf_counter()
        scores[name] = run()
        seconds[name] = time.perf_counter() - clock
    return scores, seconds, delta
