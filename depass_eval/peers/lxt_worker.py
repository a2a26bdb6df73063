"""AttnLRP through ``lxt`` (efficient mode), run by the peer's own Python.

Started by ``depass_eval.peers`` with the interpreter of ``build/peers/lxt`` (lxt 2.1,
transformers 4.52.4): it imports nothing of this project. Argument: a model folder.
Reads JSON lines ``{"input_ids": [...], "target": t}`` on stdin and writes one JSON line
per request: ``{"scores": [...], "logit": z, "seconds": s}``, each token's relevance for
the target's logit at the last position (the input x gradient that lxt's patched
backward gives, summed over the embedding: lxt's documented recipe). A request
``{"input_ids": [...], "plain": true}`` times one plain forward pass instead (no gradient,
the last position's logits only) and answers ``{"seconds": s}``: the unit
``benchmarks/peers_cost.py`` divides the peer's time by, in the peer's own environment.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import torch
from lxt.efficient import monkey_patch
from transformers import AutoConfig, AutoModelForCausalLM

#: model_type -> the transformers module lxt patches.
MODULES = {
    "llama": "transformers.models.llama.modeling_llama",
    "gemma3_text": "transformers.models.gemma3.modeling_gemma3",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
    "qwen3": "transformers.models.qwen3.modeling_qwen3",
}


def main() -> int:
    folder = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in MODULES:
        print(json.dumps({"error": f"lxt has no AttnLRP rules for {model_type}"}), flush=True)
        return 2
    monkey_patch(importlib.import_module(MODULES[model_type]))
    model = AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    print(json.dumps({"ready": True, "lxt": "2.1"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        ids = torch.tensor([request["input_ids"]])
        if request.get("plain"):
            with torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
            continue
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logit = logits[0, -1, request["target"]]
        logit.backward()
        relevance = (embeds * embeds.grad).float().sum(-1)[0]
        reply = {
            "scores": relevance.tolist(),
            "logit": float(logit),
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
