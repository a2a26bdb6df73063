"""Train the embedded default model, ``models/depass-tiny``, from a fixed seed on CPU.

A four-layer Llama (LlamaForCausalLM, about 1.3 M parameters) with a word-level tokenizer,
trained on the two tasks of ``scripts/default_model_tasks.py``: name-mover sentences
(answer: the name that is not repeated) and Known_1000 facts (answer: the attribute).
The corpus is generated here from those lists; the loss is the cross-entropy of the answer
token after each prompt, with eager attention (what the engine loads). It saves the model
and tokenizer, checks that eager and SDPA attention give the same top-1 on every prompt,
evaluates on the held-out cases and measures DePass faithfulness with the engine.

    .venv/bin/python scripts/train_default_model.py            # make model
    .venv/bin/python scripts/train_default_model.py --eval-only

Rebuilding ``data/known_facts.json`` from a copy of Known_1000 (not needed to train):

    .venv/bin/python scripts/train_default_model.py --refresh-facts ../shared/data/known_1000.json
"""

from __future__ import annotations

import os

# OpenMP threads that find no work spin for a while before they sleep; when another job
# shares the two cores, that spinning slowed this script eight- to a hundred-fold in our
# measurements. A short spin keeps the idle-machine speed (numerics are unchanged). It must
# be set before torch loads its OpenMP runtime.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import default_model_tasks as tasks

SEED = 1234
THREADS = 2

#: Model shape: small enough for 2 CPU cores, large enough to hold ~360 facts.
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def build_tokenizer(vocab: list[str]):
    """A word-level tokenizer over ``vocab`` that prepends ``<s>``, as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {word: i for i, word in enumerate(vocab)}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", ids["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def build_model(tokenizer, attention: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attention,
        **MODEL_SHAPE,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, prompts: list[str], answers: list[str]):
    """(input ids (B, N) right-padded, index of each prompt's last token, answer ids)."""
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(prompts)]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    last = torch.tensor([len(x) - 1 for x in ids])
    target = torch.tensor(tokenizer.convert_tokens_to_ids(answers))
    return batch, last, target


def answer_loss(model, batch, last, target):
    """Cross-entropy of the answer after the last prompt token. Padding is on the right and
    attention is causal, so the padded tail never reaches the positions read."""
    hidden = model.model(input_ids=batch).last_hidden_state  # (B, N, D)
    logits = model.lm_head(hidden[torch.arange(len(last)), last])  # (B, V)
    loss = torch.nn.functional.cross_entropy(logits, target)
    return loss, (logits.detach().argmax(-1) == target).float()  # loss, (B,) hits


def train(args) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    facts = tasks.load_facts()
    fact_train, _ = tasks.fact_split(facts)
    ioi_pairs, _ = tasks.ioi_pair_split()
    tokenizer = build_tokenizer(tasks.vocabulary(facts))
    model = build_model(tokenizer, "eager").train()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"vocabulary {len(tokenizer)} words, {params:,} parameters; "
        f"{len(facts)} facts ({len(fact_train)} training prompts), "
        f"{len(ioi_pairs)} training name pairs; {args.steps} steps of "
        f"{args.ioi_batch} + {args.fact_batch} prompts",
        flush=True,
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    clock = time.perf_counter()
    running = {"loss": 0.0, "ioi": 0.0, "facts": 0.0}
    for step in range(args.steps):
        cases: list = [tasks.sample_ioi(rng, ioi_pairs) for _ in range(args.ioi_batch)]
        for _ in range(args.fact_batch):
            if not order:
                order = list(range(len(fact_train)))
                rng.shuffle(order)
            cases.append(fact_train[order.pop()])
        batch, last, target = encode(
            tokenizer, [c.prompt for c in cases], [c.answer for c in cases]
        )
        loss, hits = answer_loss(model, batch, last, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running["loss"] += loss.item()
        running["ioi"] += float(hits[: args.ioi_batch].mean())
        running["facts"] += float(hits[args.ioi_batch :].mean())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = args.log_every if (step + 1) % args.log_every == 0 else (step + 1) % args.log_every
            print(
                f"step {step + 1:5d}  loss {running['loss'] / n:.4f}  "
                f"train acc: name mover {running['ioi'] / n:.3f}, facts {running['facts'] / n:.3f}"
                f"  lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - clock:6.0f} s",
                flush=True,
            )
            running = dict.fromkeys(running, 0.0)
    seconds = time.perf_counter() - clock
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The engine loads exactly the generic fast tokenizer when the config names it.
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    for path in out.iterdir():  # safetensors writes 0600; the files are meant to be shared
        path.chmod(0o644)
    return {"train_seconds": round(seconds, 1), "parameters": params}


def evaluate(out: Path, faithfulness: bool = True, other_splits: tuple[str, ...] = ()) -> dict:
    """Held-out accuracy per task (eager attention, as the engine loads it) and DePass
    faithfulness figures, printed and returned."""
    from engine import DePassEngine

    engine = DePassEngine.from_pretrained(str(out))
    model, tokenizer = engine.model, engine.tokenizer
    facts = tasks.load_facts()
    fact_train, fact_held = tasks.fact_split(facts)
    ioi = tasks.held_out_ioi(200)
    ioi_more = tasks.held_out_ioi(2000, seed=tasks.SPLIT_SEED + 1)
    train_pairs, _ = tasks.ioi_pair_split()
    ioi_train = [tasks.sample_ioi(random.Random(7), train_pairs) for _ in range(2000)]
    report: dict = {
        "ioi_held_out_200": tasks.accuracy(model, tokenizer, ioi),
        "ioi_held_out_2000": tasks.accuracy(model, tokenizer, ioi_more),
        "ioi_train_pairs_2000": tasks.accuracy(model, tokenizer, ioi_train),
        "facts_held_out_phrasing": tasks.accuracy(model, tokenizer, fact_held),
        "facts_trained_phrasings": tasks.accuracy(model, tokenizer, fact_train),
        "facts_count": len(facts),
    }
    # the majority attribute of each relation, as a floor for the fact accuracy
    majority = {
        r: Counter(f.attribute for f in facts if f.relation_id == r).most_common(1)[0][0]
        for r in tasks.RELATIONS
    }
    report["facts_majority_baseline"] = sum(
        f.attribute == majority[f.relation_id] for f in facts
    ) / len(facts)
    got = tasks.predictions(model, tokenizer, [c.prompt for c in fact_held])
    per_relation: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g, case in zip(got, fact_held, strict=True):
        per_relation[case.fact.relation_id][0] += g == case.answer
        per_relation[case.fact.relation_id][1] += 1
    report["facts_held_out_per_relation"] = {r: f"{a}/{n}" for r, (a, n) in per_relation.items()}
    got = tasks.predictions(model, tokenizer, [c.prompt for c in ioi_more])
    per_template: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for g, case in zip(got, ioi_more, strict=True):
        per_template[case.template][0] += g == case.answer
        per_template[case.template][1] += 1
    report["ioi_held_out_2000_per_template"] = {
        t: f"{a}/{n}" for t, (a, n) in sorted(per_template.items())
    }
    if faithfulness:
        clock = time.perf_counter()
        credits = [tasks.ioi_credit(engine, c) for c in ioi]
        for margin, name in ((False, "logit"), (True, "margin")):
            top = [
                tasks.top_token(cr, margin) == c.answer for cr, c in zip(credits, ioi, strict=True)
            ]
            report[f"depass_ioi_top1_is_A_{name}"] = sum(top) / len(top)
        credits = [tasks.fact_credit(engine, c, facts) for c in fact_held]
        for margin, name in ((False, "logit"), (True, "margin")):
            shares = [
                tasks.subject_share(cr, c, margin) for cr, c in zip(credits, fact_held, strict=True)
            ]
            report[f"depass_facts_subject_largest_{name}"] = sum(b for _, b in shares) / len(shares)
            report[f"depass_facts_subject_over_half_{name}"] = sum(
                s > 0.5 for s, _ in shares
            ) / len(shares)
            report[f"depass_facts_subject_share_mean_{name}"] = sum(s for s, _ in shares) / len(
                shares
            )
        report["depass_seconds"] = round(time.perf_counter() - clock, 1)
        # subject largest on the relations with few (< 5) and many answers, per split rule
        pairs = {(f.relation_id, f.attribute) for f in facts}
        answers = Counter(relation for relation, _ in pairs)  # relation -> distinct answers
        for split in ("softmax", *other_splits):
            if split != "softmax":
                credits = [tasks.fact_credit(engine, c, facts, split) for c in fact_held]
            counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for credit, case in zip(credits, fact_held, strict=True):
                group = "many" if answers[case.fact.relation_id] >= 5 else "few"
                for margin, name in ((False, "logit"), (True, "margin")):
                    counts[f"{group}_answers_{name}"][0] += tasks.subject_share(
                        credit, case, margin
                    )[1]
                    counts[f"{group}_answers_{name}"][1] += 1
            report[f"depass_facts_subject_largest_{split}_split"] = {
                k: f"{a}/{n}" for k, (a, n) in sorted(counts.items())
            }
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return report


def eager_matches(out: Path) -> bool:
    """Whether SDPA and eager attention give the same top-1 on every evaluation prompt."""
    from transformers import AutoModelForCausalLM

    from engine.loading import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    facts = tasks.load_facts()
    prompts = [c.prompt for c in tasks.held_out_ioi(200)]
    prompts += [c.prompt for part in tasks.fact_split(facts) for c in part]
    runs = []
    for attention in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation=attention)
        runs.append(tasks.predictions(model.eval(), tokenizer, prompts))
    return runs[0] == runs[1]


def refresh_facts(source: Path) -> None:
    records = json.loads(Path(source).read_text())
    kept = tasks.select_known_facts(records)
    tasks.FACTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    tasks.FACTS_PATH.write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
    counts = Counter(r["relation_id"] for r in kept)
    print(f"wrote {len(kept)} facts to {tasks.FACTS_PATH}: {dict(counts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(tasks.MODEL_DIR), help="model folder to write")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ioi-batch", type=int, default=32)
    parser.add_argument("--fact-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out, no training")
    parser.add_argument("--no-depass", action="store_true", help="skip the faithfulness run")
    parser.add_argument(
        "--compare-splits", action="store_true", help="facts faithfulness under every MLP split"
    )
    parser.add_argument(
        "--refresh-facts", type=Path, help="rebuild data/known_facts.json from Known_1000 first"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.refresh_facts:
        refresh_facts(args.refresh_facts)
    out = Path(args.out)
    summary: dict = {}
    if not args.eval_only:
        summary.update(train(args))
        same = eager_matches(out)
        print(f"eager and sdpa attention agree on every evaluation prompt: {same}")
        if not same:
            raise SystemExit("eager attention changes predictions; the engine would disagree")
    splits = ("relu", "linear", "max", "taylor") if args.compare_splits else ()
    summary.update(evaluate(out, faithfulness=not args.no_depass, other_splits=splits))
    total = time.perf_counter() - start
    print(f"wall time {total:.0f} s ({total / 60:.1f} min)")
    if not args.eval_only:
        summary.update(
            seed=args.seed,
            steps=args.steps,
            batch=args.ioi_batch + args.fact_batch,
            threads=args.threads,
            wall_seconds=round(total, 1),
            torch=torch.__version__,
            transformers=__import__("transformers").__version__,
        )
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
