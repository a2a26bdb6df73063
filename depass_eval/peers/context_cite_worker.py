"""ContextCite through ``context-cite``, run by the peer's own Python.

Started by ``depass_eval.peers`` with the interpreter of ``build/peers/context-cite``
(context-cite 0.0.4, transformers 4.52.4): it imports nothing of this project. Arguments:
a model folder and the torch threads. Reads JSON lines ``{"context": str, "query": str,
"sources": "word" | "sentence", "ablations": n, "seed": s}`` and writes one JSON line per
request: ``{"sources": [[start, end], ...], "scores": [...], "response": str, ...}``:
each source's character span in the context and its ContextCite score (the weight of
the sparse linear surrogate, fitted on ``ablations`` random ablations of the sources,
for the log-probability of the model's one-token greedy response).

The prompt is ``context + query`` exactly (a chat template that passes the user's text
through, with the BOS the tokenizer adds): the same prompt the other methods see.
Sentences are split by a regular expression (:class:`SentencePartitioner`, through
ContextCite's partitioner interface) because its own sentence splitter needs NLTK data
that only a download outside the package registries provides; words use its own
splitter (spaCy's English tokenizer). The process has no network: its proxy variables
point at a closed local port.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import torch
from context_cite import ContextCiter
from context_cite.context_partitioner import BaseContextPartitioner, SimpleContextPartitioner
from transformers import AutoModelForCausalLM, AutoTokenizer

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class SentencePartitioner(BaseContextPartitioner):
    """Sources = sentences (split after . ! ? and whitespace), the separators kept."""

    def __init__(self, context: str) -> None:
        super().__init__(context)
        self.parts: list[str] = []
        self.separators: list[str] = []
        self.split_context()

    def split_context(self) -> None:
        cursor, separator = 0, ""
        for match in SENTENCE_END.finditer(self.context):
            self.parts.append(self.context[cursor : match.start()])
            self.separators.append(separator)
            separator, cursor = match.group(0), match.end()
        if cursor < len(self.context):
            self.parts.append(self.context[cursor:])
            self.separators.append(separator)

    @property
    def num_sources(self) -> int:
        return len(self.parts)

    def get_source(self, index: int) -> str:
        return self.parts[index]

    def get_context(self, mask: np.ndarray | None = None) -> str:
        keep = np.ones(self.num_sources, dtype=bool) if mask is None else np.asarray(mask)
        text = ""
        for index, (separator, part) in enumerate(zip(self.separators, self.parts, strict=True)):
            if keep[index]:
                text += (separator if text else "") + part
        return text


def spans(context: str, parts: list[str]) -> list[list[int]]:
    """Each part's [start, end) in the context, searched left to right."""
    out, cursor = [], 0
    for part in parts:
        start = context.find(part, cursor)
        out.append([start, start + len(part)])
        cursor = start + len(part)
    return out


def main() -> int:
    folder = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    model = AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adds_bos = tokenizer.bos_token_id is not None and (
        tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    )
    tokenizer.chat_template = ("{{ bos_token }}" if adds_bos else "") + (
        "{{ messages[0]['content'] }}"
    )
    print(json.dumps({"ready": True, "context-cite": "0.0.4"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        torch.manual_seed(request.get("seed", 0))
        np.random.seed(request.get("seed", 0))
        context = request["context"]
        partitioner = (
            SentencePartitioner(context)
            if request["sources"] == "sentence"
            else SimpleContextPartitioner(context, source_type="word")
        )
        citer = ContextCiter(
            model,
            tokenizer,
            context,
            request["query"],
            generate_kwargs={"max_new_tokens": 1, "do_sample": False},
            num_ablations=request.get("ablations", 64),
            prompt_template="{context}{query}",
            partitioner=partitioner,
        )
        scores = citer.get_attributions(verbose=False)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + request["query"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        reply = {
            "exact": partitioner.get_context() == context,
            # the ids ContextCite feeds the model (its own encoding of the chat prompt)
            "prompt_ids": tokenizer.encode(prompt, add_special_tokens=False),
            "sources": spans(context, list(partitioner.parts)),
            "scores": np.asarray(scores, dtype=float).tolist(),
            "response": citer.response,
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
