"""The evaluation suite (``depass_eval``) on the embedded model ``models/depass-tiny``.

Each protocol runs end to end on a few prompts and writes well-formed output; the pieces
that decide the figures are checked on their own: patch-top of the known-decisive token
(the name mover's ``A``) drops the answer's probability, the masking hooks change the
output exactly where they should and leave nothing behind, probe training is
deterministic, a run resumes where it stopped, the tuning slice is disjoint from the test
prompts, and DePass by URL (a real service, through the SDK) gives the in-process scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from depass_eval import perturb, run_protocol
from depass_eval.baselines import PAPER_BASELINES
from depass_eval.cli import main as cli_main
from depass_eval.data import Case
from depass_eval.hooks import gradient_x_activation, masked, masked_logits
from depass_eval.model import EvalModel
from depass_eval.peers import PEERS
from depass_eval.probes import fit_probe, texts_and_labels
from depass_eval.runner import Context, run_rows, select_correct
from depass_eval.source import LocalDePass, RemoteDePass, Split
from engine import AttributionRequest, DePassEngine

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "depass-tiny"
sys.path.insert(0, str(REPO / "scripts"))

import default_model_tasks as tasks  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny() -> EvalModel:
    return EvalModel.load(str(TINY), name="depass-tiny")


@pytest.fixture(scope="module")
def depass(tiny: EvalModel) -> LocalDePass:
    return LocalDePass(engine=tiny.engine)


def _down_projection(model: EvalModel, layer: int) -> torch.nn.Module:
    """The dense MLP output projection of ``layer`` (its input: the neurons)."""
    block = model.block(layer)
    return block.get_submodule(model.family.mlp.for_layer(block).down)


@pytest.fixture(scope="module")
def ioi_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out name-mover prompts of the embedded model, as a data set file."""
    path = tmp_path_factory.mktemp("data") / "name_mover.json"
    cases = tasks.held_out_ioi(40)
    path.write_text(
        json.dumps([{"id": i, "prompt": c.prompt, "answer": c.answer} for i, c in enumerate(cases)])
    )
    return path


def _read(out: Path) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    assert run["machine"]["cpus"] >= 1 and run["started"] and run["rows"] == len(rows)
    return results, summary, rows


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


def _unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------- protocol 1


def test_tokens_protocol_writes_every_method(
    tiny: EvalModel, ioi_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tokens"
    options = {"splits": ["softmax", "relu", "taylor"], "ig_steps": 4}
    summary = run_protocol(
        "depass-tiny", "tokens", out, str(ioi_file), 3, options=options, loaded=tiny, progress=False
    )
    results, text, rows = _read(out)
    assert results == json.loads(json.dumps(summary))
    expected = {
        "depass-softmax",
        "depass-relu",
        "depass-taylor",
        "attention-last",
        "attention-mean",
        "attention-rollout",
        "integrated-gradients",
        "gradient-x-input",
        "gradient-norm",
        "leave-one-out",
    }
    expected |= {f"depass-{rule}-abs" for rule in ("softmax", "relu", "taylor")}
    assert set(results["methods"]) == expected and len(rows) == 3
    for entry in results["methods"].values():
        for mode in perturb.MODES:
            assert len(entry[mode]["curve"]) == len(perturb.PERCENTS)
            assert all(_unit(v) for v in entry[mode]["curve"])
        assert entry["patch"]["curve"][-1] == pytest.approx(
            results["methods"]["depass-softmax"]["patch"]["curve"][-1]
        )
        assert entry["recover"]["curve"][-1] == 0.0  # all tokens kept: the prompt itself
        assert entry["seconds_per_prompt"] > 0
    assert "| depass-softmax |" in text and "patch AUC" in text
    assert _is_png(out / "curves.png")
    assert all(len(r["scores"]["depass-softmax"]) == len(r["tokens"]) for r in rows)


def test_patch_top_of_the_decisive_token_drops_the_answer(
    tiny: EvalModel, depass: LocalDePass
) -> None:
    """On the name mover the answer comes from the token of A: DePass ranks it first, and
    deleting that one token (patch-top) takes most of the answer's probability away,
    far more than deleting the last-ranked token."""
    drops, others = [], []
    for case in tasks.held_out_ioi(20):
        ids = tiny.encode(case.prompt)
        answer = tiny.answer_id(case.answer)
        scores = depass.token_scores(ids, answer, Split())
        ranking = perturb.ranked_middle(scores)
        assert tiny.token_texts([ids[ranking[0]]])[0] == case.answer
        p, patched, other = tiny.answer_probs(
            [
                ids,
                perturb.edited(ids, ranking, "patch", 1),
                perturb.edited(ids, ranking[-1:], "patch", 1),
            ],
            answer,
        ).tolist()
        drops.append(perturb.relative_change(p, patched))
        others.append(perturb.relative_change(p, other))
    assert min(drops) > 0.5 and np.mean(drops) > 0.9
    # the last-ranked token is often the repeated name B, whose deletion breaks the task;
    # typically another token's deletion barely moves the answer
    assert np.median(others) < 0.05 and np.mean(drops) > np.mean(others) + 0.5


def test_margin_scores_are_the_answer_minus_the_runner_up(
    tiny: EvalModel, depass: LocalDePass
) -> None:
    """The margin variant scores each token's share of logit(answer) - logit(runner-up):
    the difference of the two targets' scores (each adds up to its own logit), so the
    margins add up to the model's logit margin; on the name mover the runner-up is the
    other name, and the margin still ranks A first."""
    from depass_eval.protocols.tokens import runner_up, splits_of

    case = tasks.held_out_ioi(1)[0]
    ids = tiny.encode(case.prompt)
    answer = tiny.answer_id(case.answer)
    logits = tiny.last_logits([ids])[0]
    other = runner_up(logits, answer)
    assert other != answer
    plain = depass.token_scores(ids, answer, Split())
    against = depass.token_scores(ids, other, Split())
    margin = depass.token_scores(ids, answer, Split(margin="runner-up"), other)
    np.testing.assert_allclose(margin, plain - against, atol=1e-5)
    result = depass.engine.attribute(
        AttributionRequest(input_ids=ids, positions=[-1], targets=[answer, other])
    )
    remainder = result.remainder_scores[0]  # (T,)
    total = margin.sum() + float(remainder[0] - remainder[1])
    assert total == pytest.approx(float(logits[answer] - logits[other]), abs=1e-3)
    assert tiny.token_texts([ids[perturb.ranked_middle(margin)[0]]])[0] == case.answer
    labels = [s.label for s in splits_of({"splits": ["softmax"], "margin": "both"})]
    assert labels == ["depass-softmax-margin", "depass-softmax"]
    named = splits_of({"splits": ["taylor"], "margin": "on", "margin_against": "other-name"})
    assert [s.label for s in named] == ["depass-taylor-margin-name"]


def test_other_name_is_the_ioi_subject(tiny: EvalModel) -> None:
    """The IOI competitor: the name the prompt gives twice, not the answer."""
    from depass_eval.protocols.tokens import other_name

    prompt = "Then, Eleanor and Deanna were thinking about going. Eleanor wanted to give it to"
    assert other_name(tiny, prompt, "Deanna") == tiny.answer_id("Eleanor")


def test_edits_keep_first_and_last_tokens() -> None:
    ids = [10, 11, 12, 13, 14, 15]
    ranking = perturb.ranked_middle(np.array([9.0, 1.0, 5.0, 3.0, 5.0, 9.0]))
    assert ranking == [2, 4, 3, 1]  # ties: the earlier position first; ends not ranked
    assert perturb.edited(ids, ranking, "patch", 2) == (10, 11, 13, 15)
    assert perturb.edited(ids, ranking, "recover", 1) == (10, 12, 15)
    assert [perturb.count_for(k, 4) for k in perturb.PERCENTS] == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4]
    assert perturb.relative_change(0.5, 0.0) == 1.0 and perturb.relative_change(0.2, 0.9) == 1.0
    assert perturb.relative_change(0.5, 0.4) == pytest.approx(0.2)


def test_paper_counts_are_the_floor_at_least_one() -> None:
    """The paper's k% of n tokens is max(1, int(n * p)); the strict rules round up."""
    paper, strict = perturb.EditRules("paper"), perturb.EditRules("strict")
    assert [paper.count(k, 4) for k in perturb.PERCENTS] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    assert [strict.count(k, 4) for k in perturb.PERCENTS] == [1, 1, 2, 2, 2, 3, 3, 4, 4, 4]
    assert paper.count(70, 90) == 63 and paper.count(10, 5) == 1 and paper.count(100, 7) == 7
    with pytest.raises(ValueError, match="rules"):
        perturb.EditRules("loose")


def test_paper_ranks_the_first_token_unless_it_is_a_bos(tiny: EvalModel) -> None:
    """With a BOS (the embedded model's tokenizer adds one) the paper ranks 1..N-2; without
    one (SmolLM2's adds none) 0..N-2; the strict rules never rank the first token. A
    recover edit keeps the unranked positions."""
    ids = tiny.encode(tasks.held_out_ioi(1)[0].prompt)
    bos = tiny.tokenizer.bos_token_id
    assert ids[0] == bos
    scores = np.arange(len(ids), dtype=float)[::-1].copy()  # the first position ranks highest
    paper, strict = perturb.EditRules("paper"), perturb.EditRules("strict")
    n = len(ids)
    assert sorted(paper.ranking(ids, scores, bos)) == list(range(1, n - 1))
    assert sorted(paper.ranking(ids[1:], scores[1:], bos)) == list(range(0, n - 2))
    assert sorted(strict.ranking(ids[1:], scores[1:], bos)) == list(range(1, n - 2))
    no_bos = paper.ranking(ids[1:], scores[1:], bos)
    assert paper.edit(tiny.tokenizer, ids[1:], no_bos, "patch", 1)[0] == bos  # re-added
    kept = paper.edit(tiny.tokenizer, ids, paper.ranking(ids, scores, bos), "recover", 1)
    assert kept == (bos, ids[1], ids[-1])


def test_paper_edits_are_retokenised(smollm2: DePassEngine) -> None:
    """A deletion can join two pieces of a word: the paper decodes the kept ids and
    tokenises the text again (SmolLM2's BPE: 'C|atal|onia' without 'atal' is 'Con|ia')."""
    tokenizer = smollm2.tokenizer
    prompt = "Catalonia belongs to the continent of"
    ids = list(tokenizer(prompt)["input_ids"])
    scores = np.zeros(len(ids))
    scores[1] = 1.0
    paper, strict = perturb.EditRules("paper"), perturb.EditRules("strict")
    kept = strict.edit(tokenizer, ids, strict.ranking(ids, scores, None), "patch", 1)
    again = paper.edit(tokenizer, ids, paper.ranking(ids, scores, None), "patch", 1)
    assert kept == tuple(ids[:1] + ids[2:])
    assert again == tuple(tokenizer("Conia belongs to the continent of")["input_ids"])
    assert again != kept and tokenizer.decode(again) == tokenizer.decode(kept)


def test_paper_gradients_differentiate_the_log_probability(tiny: EvalModel) -> None:
    """Under the paper's rules the gradient baselines explain log p(target), and
    integrated gradients is the right Riemann sum of 100 steps from a zero embedding
    (checked against autograd at the points k/100)."""
    from depass_eval import baselines

    case = tasks.held_out_ioi(1)[0]
    ids, target = tiny.encode(case.prompt), tiny.answer_id(case.answer)
    embeds = tiny.embeddings()(torch.tensor([ids])).detach()

    def grad_at(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = tiny.model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]
            torch.log_softmax(logits, -1)[:, target].sum().backward()
        assert x.grad is not None
        return x.grad

    norm = baselines.gradient_norm(tiny, ids, target, "log-prob")
    np.testing.assert_allclose(norm, grad_at(embeds)[0].norm(dim=-1).numpy(), rtol=1e-4)
    assert not np.allclose(norm, baselines.gradient_norm(tiny, ids, target), rtol=1e-2)
    alphas = torch.arange(1, 101, dtype=torch.float32).view(-1, 1, 1) / 100
    hand = (grad_at(alphas * embeds).mean(0) * embeds[0]).sum(-1).numpy()
    settings = baselines.GradientSettings.for_rules("paper")
    assert (settings.objective, settings.ig_steps) == ("log-prob", 100)
    ig, _ = baselines.integrated_gradients_with_delta(
        tiny, ids, target, settings.ig_steps, settings.objective, settings.ig_method
    )
    np.testing.assert_allclose(ig, hand, rtol=1e-3, atol=1e-5)


def test_tokens_protocol_in_paper_mode(tiny: EvalModel, ioi_file: Path, tmp_path: Path) -> None:
    """Paper mode scores every prompt in file order, answered or not, against the paper's
    baselines (no occlusion); run.json and the summary record the rules."""
    records = json.loads(ioi_file.read_text())[:3]
    records[1]["answer"] = "hospital"  # the model does not answer this one
    data = tmp_path / "three.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "paper"
    options = {"rules": "paper", "splits": ["softmax"], "ig_steps": 4}
    summary = run_protocol(
        "depass-tiny", "tokens", out, str(data), 3, options=options, loaded=tiny, progress=False
    )
    results, text, rows = _read(out)
    assert [r["id"] for r in rows] == [str(r["id"]) for r in records]
    assert [r["correct"] for r in rows] == [True, False, True]
    assert set(results["methods"]) == {"depass-softmax", "depass-softmax-abs", *PAPER_BASELINES}
    assert summary["rules"] == "paper" and json.loads((out / "run.json").read_text())["rules"]
    assert "paper rules" in text and "every prompt in file order" in text


# ---------------------------------------------------------------------------- protocol 3


def test_masking_hooks_change_exactly_what_they_mask(tiny: EvalModel) -> None:
    ids = tiny.encode(tasks.held_out_ioi(1)[0].prompt)
    plain = tiny.last_logits([ids])[0]
    layers, heads, width = tiny.num_layers, tiny.num_heads, tiny.neuron_width(tiny.num_layers - 1)
    head_keep = torch.ones(3, layers, heads)
    head_keep[1, 2, 1] = 0.0  # row 1: one head zeroed
    neuron_keep = {layers - 1: torch.ones(3, width)}
    neuron_keep[layers - 1][2, :] = 0.0  # row 2: the last MLP zeroed
    logits = masked_logits(tiny, ids, head_keep, neuron_keep)
    torch.testing.assert_close(logits[0], plain, rtol=1e-5, atol=1e-5)  # nothing masked
    assert (logits[1] - plain).abs().max() > 1e-3
    # the last MLP zeroed = the model with that MLP's output removed, computed by hand
    captured: dict[str, torch.Tensor] = {}
    mlp = _down_projection(tiny, layers - 1)
    handle = mlp.register_forward_hook(lambda _m, _i, out: captured.setdefault("mlp", out))
    tiny.last_logits([ids])
    handle.remove()
    norm = tiny.family.final_norm_module(tiny.model)
    head = tiny.unembedding()
    with torch.no_grad():
        resid = tiny.residual_all(ids, layers)  # h^L, before the final norm
        expected = head(norm((resid - captured["mlp"][0])[None]))[0, -1]
    torch.testing.assert_close(logits[2], expected, rtol=1e-4, atol=1e-4)
    with masked(tiny, torch.zeros(1, layers, heads)):
        pass
    torch.testing.assert_close(tiny.last_logits([ids])[0], plain)  # hooks removed


def test_gradient_x_activation_matches_autograd(tiny: EvalModel) -> None:
    """Per-head scores add up to (grad x act) over the whole o_proj input."""
    case = tasks.held_out_ioi(1)[0]
    ids, answer = tiny.encode(case.prompt), tiny.answer_id(case.answer)
    heads, neurons = gradient_x_activation(tiny, ids, answer, [tiny.num_layers - 1])
    assert heads.shape == (tiny.num_layers, tiny.num_heads)
    assert neurons[tiny.num_layers - 1].shape == (tiny.neuron_width(tiny.num_layers - 1),)
    assert torch.isfinite(heads).all() and heads.abs().sum() > 0


def test_paper_component_baselines_are_chunks_of_the_attention_output(tiny: EvalModel) -> None:
    """The paper's ``atp-chunk`` is |act x grad| of the o_proj OUTPUT at the last position
    (cross-entropy of the argmax token), summed over H contiguous chunks of D / H; its
    ``norm-chunk`` the chunks' norms; the neuron ``atp`` / ``coef`` / ``norm`` read the
    down_proj input there. Checked against autograd by hand; a chunk is not a head."""
    from depass_eval.hooks import paper_component_scores

    ids = tiny.encode(tasks.held_out_ioi(1)[0].prompt)
    layer, last_layer = 2, tiny.num_layers - 1
    got = paper_component_scores(tiny, ids, [last_layer])
    store: dict[str, torch.Tensor] = {}
    o_proj, down = tiny.output_projection(layer), _down_projection(tiny, last_layer)
    handles = [
        o_proj.register_forward_hook(lambda _m, _a, out: store.setdefault("out", out)),
        down.register_forward_pre_hook(lambda _m, args: store.setdefault("act", args[0])),
    ]
    with torch.enable_grad():
        embeds = tiny.embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        logits = tiny.model(inputs_embeds=embeds).logits[0, -1]
        loss = -torch.log_softmax(logits, -1)[logits.argmax()]
        out_grad, act_grad = torch.autograd.grad(loss, [store["out"], store["act"]])
    for handle in handles:
        handle.remove()
    out, act = store["out"][0, -1].detach(), store["act"][0, -1].detach()
    chunks = (out * out_grad[0, -1]).abs().view(tiny.num_heads, -1).sum(-1)
    torch.testing.assert_close(got["heads"]["atp-chunk"][layer], chunks, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        got["heads"]["norm-chunk"][layer], out.view(tiny.num_heads, -1).norm(dim=-1)
    )
    atp = (act * act_grad[0, -1]).abs()
    torch.testing.assert_close(got["neurons"]["atp"][last_layer], atp, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got["neurons"]["coef"][last_layer], act.abs())
    torch.testing.assert_close(
        got["neurons"]["norm"][last_layer], act.abs() * down.weight.detach().norm(dim=0)
    )
    per_head, _ = gradient_x_activation(tiny, ids, tiny.answer_id("Tom"), [])
    assert not torch.allclose(got["heads"]["atp-chunk"], per_head.abs(), rtol=1e-2)


def test_every_layers_neurons_in_one_request(tiny: EvalModel, depass: LocalDePass) -> None:
    """The paper ranks every layer's neurons at once: one request with the list of layers
    (the engine answers the taylor rule by reverse mode) gives each layer's forward-mode
    neuron scores."""
    case = tasks.held_out_ioi(1)[0]
    ids, answer = tiny.encode(case.prompt), tiny.answer_id(case.answer)
    layers = list(range(tiny.num_layers))
    split = Split("taylor", ignore_bos=False)
    together = depass.neuron_scores_of_layers(ids, answer, layers, split)
    assert together.shape == (tiny.num_layers, tiny.info.intermediate_size)
    for layer in layers:
        np.testing.assert_allclose(
            together[layer], depass.neuron_scores(ids, answer, layer, split), atol=1e-4
        )


def test_paper_success_is_a_greedy_generation_starting_with_the_answer(
    tiny: EvalModel,
) -> None:
    """Greedy generation under a zeroing: row 0 (nothing zeroed) continues as the model
    does; the success rule reads the continuation's start; 1% of 270 heads is 3."""
    from depass_eval.hooks import masked_generate
    from depass_eval.protocols.components import one_percent, starts_with_answer

    case = tasks.held_out_ioi(1)[0]
    ids = tiny.encode(case.prompt)
    head_keep = torch.ones(2, tiny.num_layers, tiny.num_heads)
    head_keep[1] = 0.0  # every head zeroed
    logits, tokens = masked_generate(tiny, ids, head_keep, {}, 3)
    seq = list(ids)
    for _ in range(3):
        seq.append(int(tiny.last_logits([seq])[0].argmax()))
    assert tokens[0].tolist() == seq[len(ids) :]
    torch.testing.assert_close(logits[0], tiny.last_logits([ids])[0], rtol=1e-5, atol=1e-5)
    assert tokens[1].tolist() != tokens[0].tolist()
    assert starts_with_answer(tiny.tokenizer.decode(tokens[0]), case.answer)
    assert starts_with_answer(" Paris, France", "Paris") and not starts_with_answer("Par", "Paris")
    assert [one_percent(n) for n in (270, 72, 46080, 16)] == [3, 1, 461, 1]


def test_components_protocol_in_paper_mode(tiny: EvalModel, ioi_file: Path, tmp_path: Path) -> None:
    """Paper mode: top 1% of heads and of every layer's neurons, each method of the paper
    and the stronger per-component reading, success by generation."""
    from depass_eval.protocols.components import PAPER_METHODS

    out = tmp_path / "components-paper"
    summary = run_protocol(
        "depass-tiny",
        "components",
        out,
        str(ioi_file),
        3,
        options={"rules": "paper"},
        loaded=tiny,
        progress=False,
    )
    results, text, rows = _read(out)
    assert summary["neuron_layers"] == list(range(tiny.num_layers))
    for kind in ("heads", "neurons"):
        assert list(results[kind]) == list(PAPER_METHODS[kind])
    assert results["heads"]["depass"]["k"] == [1]  # 1% of 16 heads
    assert results["neurons"]["depass"]["k"] == [21]  # 1% of 4 x 512 neurons
    assert results["base_accuracy"] == 1.0 and results["neuron_split"] == "taylor"
    assert all(r["generated"].lstrip().startswith(r["answer"]) for r in rows)
    assert "greedy generation" in text and "atp-chunk" in text and "± " in text


def test_components_protocol_zeroing_depass_heads_hurts_most(
    tiny: EvalModel, ioi_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "components"
    options = {"head_ks": [1, 2, 4], "neuron_ks": [1, 8, 32], "neuron_layers": [-1]}
    cli_args = [
        "--model",
        str(TINY),
        "--protocol",
        "components",
        "--dataset",
        str(ioi_file),
        "--size",
        "4",
        "--out",
        str(out),
        "--no-progress",
        "--head-ks",
        "1,2,4",
        "--neuron-ks",
        "1,8,32",
        "--neuron-layers=-1",
    ]
    assert cli_main(cli_args) == 0
    results, text, rows = _read(out)
    assert options["head_ks"] == results["heads"]["depass"]["k"] and len(rows) == 4
    for kind in ("heads", "neurons"):
        for entry in results[kind].values():
            assert all(_unit(a) for a in entry["accuracy"])
            assert len(entry["mean_prob"]) == 3
    # on the name mover the top DePass head carries the answer: zeroing 4 heads ranked by
    # DePass costs more probability than zeroing 4 at random
    assert (
        results["heads"]["depass"]["relative_drop"][-1]
        > results["heads"]["random"]["relative_drop"][-1]
    )
    assert "**heads** zeroed" in text
    assert _is_png(out / "heads.png") and _is_png(out / "neurons.png")


# ---------------------------------------------------------------------------- probes, 2 and 4


def test_probe_training_is_deterministic(tiny: EvalModel) -> None:
    train = texts_and_labels("truthful_train.json", 80, seed=1)
    test = texts_and_labels("truthful_test.json", 40, seed=1)
    first = fit_probe(tiny, 2, train, test)
    second = fit_probe(tiny, 2, train, test)
    assert np.array_equal(first.weight, second.weight) and np.array_equal(first.bias, second.bias)
    assert first.test_accuracy == second.test_accuracy and _unit(first.test_accuracy)
    assert texts_and_labels("truthful_train.json", 80, seed=1)[0] == train[0]  # same sample


def test_truth_protocol(tiny: EvalModel, tmp_path: Path) -> None:
    out = tmp_path / "truth"
    run_protocol(
        "depass-tiny", "truth", out, size=3, options={"probe_size": 60}, loaded=tiny, progress=False
    )
    results, text, rows = _read(out)
    assert _unit(results["probe"]["test_accuracy"]) and results["probe"]["layer"] == 2
    assert results["max_subspace_conservation_error"] < 1e-3  # the parts add up to the residual
    assert set(results["methods"]) == {"depass-subspace", "depass-output", "random"}
    for entry in results["methods"].values():
        assert all(_unit(f) for f in entry["flipped"]) and len(entry["p_true_change"]) == 3
    assert "test accuracy" in text and _is_png(out / "truth.png") and len(rows) == 3
    # --report-only rebuilds the same report from the rows and the saved probe
    again = run_protocol(
        "depass-tiny", "truth", out, options={"probe_size": 60}, loaded=tiny, report_only=True
    )
    assert again["methods"] == results["methods"] and again["probe"] == results["probe"]


def test_truth_protocol_in_paper_mode(tiny: EvalModel, tmp_path: Path) -> None:
    """The paper's form: the wrong-information prompt, probes at layers 10..L-2 (L-2 on
    a 4-layer model), half the information span deleted, scored by the option the
    5-token generation names."""
    from depass_eval.protocols.truth_paper import chosen_option, information_span, probe_layers

    assert probe_layers(30) == list(range(10, 29)) and probe_layers(4) == [2]
    prompt = "Information: Tom got a letter.\nQuestion: who"
    span = information_span(tiny, prompt, "Tom got a letter.")
    assert tiny.token_texts([tiny.encode(prompt)[i] for i in span]) == [
        "Tom",
        "got",
        "a",
        "letter",
        ".",
    ]
    assert chosen_option(" B: Far more") == "B" and chosen_option(" Answer") is None
    out = tmp_path / "truth-paper"
    options = {"probe_size": 60, "rules": "paper"}
    run_protocol("depass-tiny", "truth", out, size=2, options=options, loaded=tiny, progress=False)
    results, text, rows = _read(out)
    assert [p["layer"] for p in results["probes"]] == [2]
    assert results["max_subspace_conservation_error"] < 1e-3
    assert set(results["methods"]) == {"depass-subspace", "self-probe", "random"}
    for row in rows:
        assert row["deleted"] == max(1, row["span_tokens"] // 2) and row["span_tokens"] > 1
        for method in row["masking"].values():
            assert len(method["deleted_tokens"]) == row["deleted"]
            assert set(method["deleted_tokens"]) <= set(row["span"])
    assert "wrong information" in text


def test_language_protocol(tiny: EvalModel, tmp_path: Path) -> None:
    out = tmp_path / "language"
    run_protocol(
        "depass-tiny",
        "language",
        out,
        size=2,
        options={"probe_size": 60},
        loaded=tiny,
        progress=False,
    )
    results, text, _rows = _read(out)
    assert results["prompts"] == 12 and results["split_layer"] == 2 and results["probe_layer"] == 3
    for value in (
        *results["probe_reads_language"].values(),
        *results["decodes_model_top1"].values(),
    ):
        assert _unit(value)
    assert "language part (DePass)" in text and _is_png(out / "language.png")


def test_paper_language_vector_sits_at_every_position(tiny: EvalModel, tmp_path: Path) -> None:
    """The paper places the language vector (last residual minus the six languages' mean)
    at every position; the strict rules at the last one. Both add up to the residual.
    The paper's probe sits at layer 20 of 32 scaled by depth."""
    from depass_eval.protocols.language import language_parts, paper_probe_layer

    resid = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    centre = torch.randn(8, generator=torch.Generator().manual_seed(1))
    vector = resid[-1] - centre
    paper, strict = language_parts(resid, centre, True), language_parts(resid, centre, False)
    for parts in (paper, strict):
        torch.testing.assert_close(parts.sum(0), resid)
    torch.testing.assert_close(paper[1], vector.expand(5, 8))
    torch.testing.assert_close(strict[1, -1], vector)
    assert not strict[1, :-1].any()
    assert [paper_probe_layer(n) for n in (32, 30, 18, 4)] == [20, 19, 11, 2]
    out = tmp_path / "language-paper"
    summary = run_protocol(
        "depass-tiny",
        "language",
        out,
        size=1,
        options={"probe_size": 60, "rules": "paper"},
        loaded=tiny,
        progress=False,
    )
    assert summary["probe_layer"] == 2 and summary["rules"] == "paper"
    assert "the language vector at every position" in (out / "summary.md").read_text()


# ---------------------------------------------------------------------------- the run loop


def test_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    seen: list[int] = []

    def work(item: int) -> dict[str, Any] | None:
        seen.append(item)
        return None if item == 3 else {"id": str(item), "square": item * item}

    run_rows(range(3), 6, str, work, tmp_path, progress=False)
    with (tmp_path / "rows.jsonl").open("a") as sink:
        sink.write('{"id": "9", "sq')  # a write torn by a kill
    rows = run_rows(range(6), 6, str, work, tmp_path, progress=False)
    assert seen == [0, 1, 2, 3, 4, 5]  # the first three were not redone
    assert [r["id"] for r in rows] == ["0", "1", "2", "4", "5"]  # 3 skipped, torn line cut


def test_tuning_slice_is_disjoint(tiny: EvalModel, depass: LocalDePass, tmp_path: Path) -> None:
    cases = [Case(str(i), c.prompt, c.answer) for i, c in enumerate(tasks.held_out_ioi(30))]
    test = select_correct(Context(tiny, depass, tmp_path / "test", seed=5), cases, 10)
    tune = select_correct(
        Context(tiny, depass, tmp_path / "tune", seed=5),
        cases,
        10,
        reverse=True,
        exclude={c["id"] for c in test["cases"]},
    )
    assert test["correct"] == tune["correct"] == 10
    assert not {c["id"] for c in test["cases"]} & {c["id"] for c in tune["cases"]}


# ---------------------------------------------------------------------------- URL mode


def test_depass_by_url_matches_the_engine(
    tiny: EvalModel, depass: LocalDePass, tmp_path: Path
) -> None:
    """A real service on the embedded model, reached through the SDK, answers every
    DePass question of the protocols as the in-process engine does."""
    from depass_client import Client
    from tests.service.conftest import serve

    case = tasks.held_out_ioi(1)[0]
    ids, answer = tiny.encode(case.prompt), tiny.answer_id(case.answer)
    with serve(TINY, tmp_path / "server.log") as url:
        remote = RemoteDePass(client=Client(base_url=url))
        remote.check_same_model(ids, tiny.last_logits([ids])[0].numpy())
        np.testing.assert_allclose(
            remote.token_scores(ids, answer, Split("relu")),
            depass.token_scores(ids, answer, Split("relu")),
            atol=1e-4,
        )
        np.testing.assert_allclose(
            remote.head_scores(ids, answer, [0, 3]),
            depass.head_scores(ids, answer, [0, 3]),
            atol=1e-4,
        )
        parts = np.stack(
            [tiny.residual_all(ids, 2).numpy(), np.zeros((len(ids), tiny.hidden_size))]
        )
        for got, want in zip(
            remote.subspace(ids, 2, parts, answer, None),
            depass.subspace(ids, 2, parts, answer, None),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, atol=1e-4)
        out = tmp_path / "by-url"
        summary = run_protocol(
            str(TINY),
            "tokens",
            out,
            str(_one_case_file(tmp_path, case)),
            1,
            options={"splits": ["softmax"], "baselines": []},
            url=url,
            loaded=tiny,
            progress=False,
        )
    assert summary["prompts"] == 1 and json.loads((out / "run.json").read_text())[
        "depass"
    ].startswith("service")


def _one_case_file(tmp_path: Path, case: Any) -> Path:
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"prompt": case.prompt, "answer": case.answer}]))
    return path


def test_headline_merges_runs_on_the_same_prompts(tmp_path: Path) -> None:
    """Two runs on one data set and the same prompts share its columns (a run of more
    DePass variants beside the baselines' run); another data set gets its own."""
    from depass_eval.headline import headline

    def entry(patch: float, recover: float) -> dict[str, Any]:
        return {"patch": {"auc": patch}, "recover": {"auc": recover}, "seconds_per_prompt": 1.0}

    runs = {
        "base": ("ioi", {"depass-softmax": entry(0.9, 0.5), "gradient-norm": entry(0.8, 0.4)}),
        "more": ("ioi", {"depass-softmax-margin": entry(0.95, 0.3)}),
        "other": ("known", {"depass-softmax": entry(0.7, 0.6)}),
    }
    for name, (dataset, methods) in runs.items():
        (tmp_path / name).mkdir()
        result = {"dataset": dataset, "prompts": 3, "methods": methods}
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    lines = headline([tmp_path / name for name in runs]).splitlines()
    assert lines[0].count("ioi (n=3)") == 2 and lines[0].count("known (n=3)") == 2
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert list(rows) == ["depass-softmax", "depass-softmax-margin", "gradient-norm"]
    assert "0.95" in rows["depass-softmax-margin"] and "0.7" in rows["depass-softmax"]


def test_side_by_side_table_of_both_rules(tmp_path: Path) -> None:
    """One data set under both rules: each AUC with its standard error, a method only one
    run has left blank in the other, and the verdict of each rules."""
    from depass_eval.headline import side_by_side

    def entry(patch: float, recover: float) -> dict[str, Any]:
        return {
            "patch": {"auc": patch, "auc_sem": 0.01},
            "recover": {"auc": recover, "auc_sem": 0.02},
        }

    def comparison(ours: float, theirs: float) -> dict[str, Any]:
        return {
            "best_depass": "depass-softmax",
            "best_depass_auc": ours,
            "best_baseline": "gradient-norm",
            "best_baseline_auc": theirs,
            "depass_wins": ours > theirs,
        }

    runs = {
        "strict": {
            "prompts": 200,
            "methods": {
                "depass-softmax": entry(0.96, 0.6),
                "leave-one-out": entry(0.9, 0.67),
                "gradient-norm": entry(0.9, 0.61),
            },
            "comparison": {"patch": comparison(0.96, 0.90), "recover": comparison(0.6, 0.61)},
        },
        "paper": {
            "prompts": 180,
            "methods": {
                "depass-softmax": entry(0.84, 0.5),
                "attnlrp": entry(0.88, 0.45),
                "gradient-norm": entry(0.88, 0.46),
            },
            "comparison": {"patch": comparison(0.84, 0.88)},
        },
    }
    for name, result in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    text = side_by_side(tmp_path / "strict", tmp_path / "paper")
    lines = text.splitlines()
    assert "patch AUC ↑ strict (n=200)" in lines[0] and "recover AUC ↓ paper (n=180)" in lines[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:6]}
    assert list(rows) == ["depass-softmax", "attnlrp", "gradient-norm", "leave-one-out"]
    assert [c.strip() for c in rows["depass-softmax"]] == [
        "0.960 ± 0.010",
        "0.840 ± 0.010",
        "0.600 ± 0.020",
        "0.500 ± 0.020",
    ]
    assert rows["attnlrp"][0].strip() == "" and rows["leave-one-out"][1].strip() == ""
    verdicts = [line for line in lines if line.startswith("- ")]
    assert verdicts[0].startswith("- strict, patch-top: `depass-softmax` 0.960")
    assert verdicts[0].endswith("DePass wins.")  # 0.06 apart, sem 0.01 each
    assert "DePass ties (within twice the standard error)" in verdicts[1]  # 0.01 apart
    assert verdicts[2].startswith("- paper, patch-top") and verdicts[2].endswith("loses.")


def test_run_summary_calls_a_gap_inside_the_standard_error_a_tie() -> None:
    """A run's own summary.md judges its best DePass variant against its best baseline
    with the tie rule of the side-by-side table, not by the sign of the gap alone."""
    from depass_eval.protocols.tokens import markdown

    def entry(patch: float, recover: float) -> dict[str, Any]:
        return {
            "patch": {"auc": patch, "auc_sem": 0.003},
            "recover": {"auc": recover, "auc_sem": 0.010},
            "seconds_per_prompt": 1.0,
        }

    def comparison(mode: str, ours: float, theirs: float) -> dict[str, Any]:
        better = ours > theirs if mode == "patch" else ours < theirs
        return {
            "best_depass": "depass-softmax",
            "best_depass_auc": ours,
            "best_baseline": "gradient-norm",
            "best_baseline_auc": theirs,
            "depass_wins": better,
            "margin": ours - theirs,
        }

    summary = {
        "prompts": 100,
        "rules": "paper",
        "mean_tokens": 42.0,
        "mean_answer_prob": 0.15,
        "answered_correctly": 0.4,
        "methods": {"depass-softmax": entry(0.991, 0.684), "gradient-norm": entry(0.993, 0.541)},
        "comparison": {
            "patch": comparison("patch", 0.991, 0.993),
            "recover": comparison("recover", 0.684, 0.541),
        },
    }
    lines = [line for line in markdown(summary, "t").splitlines() if line.startswith("- ")]
    assert lines[0].endswith("DePass ties (within twice the standard error, a gap of 0.002).")
    assert lines[1].endswith("DePass loses (by 0.143).")


def test_verdicts_judge_depass_against_every_method(tmp_path: Path) -> None:
    """``--verdicts``: per curve, DePass's best variant against each other method (peers
    and baselines alike), best first, with the tie rule of the side-by-side table and
    each curve's direction (patch-top higher is better, recover-top lower)."""
    from depass_eval.headline import verdicts

    def entry(patch: float, recover: float) -> dict[str, Any]:
        return {
            "patch": {"auc": patch, "auc_sem": 0.01},
            "recover": {"auc": recover, "auc_sem": 0.01},
        }

    methods = {
        "depass-softmax": entry(0.95, 0.70),
        "depass-softmax-abs": entry(0.90, 0.60),
        "attnlrp": entry(0.96, 0.55),  # patch: 0.01 above DePass's best, a tie; recover: wins
        "context-cite": entry(0.85, 0.61),  # patch: 0.10 below, DePass wins; recover: a tie
        "attention-rollout": entry(0.80, 0.80),  # DePass wins both
    }
    run = tmp_path / "paper-peers-ioi"
    run.mkdir()
    result = {"prompts": 200, "rules": "paper", "methods": methods}
    (run / "results.json").write_text(json.dumps(result))
    lines = verdicts(run).splitlines()
    assert lines[0] == "## paper-peers-ioi (paper rules, n=200)"
    patch, recover = (line for line in lines if line.startswith("- "))
    assert patch.startswith("- patch-top, `depass-softmax` 0.950 ± 0.010 against `attnlrp`")
    assert [part.split(": ")[-1] for part in patch.split("; ")] == ["ties", "wins", "wins"]
    assert patch.index("`context-cite`") < patch.index("`attention-rollout`")
    assert recover.startswith("- recover-top, `depass-softmax-abs` 0.600 ± 0.010 against")
    assert [part.split(": ")[-1] for part in recover.split("; ")] == ["loses", "ties", "wins"]
    assert "`attnlrp` 0.550 ± 0.010: loses" in recover
    cli = subprocess.run(
        [sys.executable, "-m", "depass_eval.headline", "--verdicts", str(run), str(run)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cli.stdout.count("## paper-peers-ioi") == 2 and patch in cli.stdout


# ---------------------------------------------------------------------------- the peers


def _peer_or_skip(name: str) -> None:
    """Skip when the peer's environment is not built (make peers), except under CI,
    which builds it first: there it fails."""
    import os

    from depass_eval.peers import PEERS

    why = PEERS[name].missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI builds the peers first (make peers): {why}")
    if why:
        pytest.skip(why)


def test_legacy_config_keeps_the_rope_bases() -> None:
    """transformers 4.x reads the rotary bases from rope_theta (and Gemma 3's local one
    from rope_local_base_freq); without them it silently uses its defaults."""
    from depass_eval.peers import legacy_config

    llama = legacy_config({"model_type": "llama", "rope_parameters": {"rope_theta": 1e5}})
    assert llama["rope_theta"] == 1e5 and "rope_parameters" not in llama
    gemma = legacy_config(
        {
            "model_type": "gemma3_text",
            "dtype": "float32",
            "_sliding_window_pattern": 6,
            "rope_parameters": {
                "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            },
        }
    )
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (1e6, 1e4)
    assert gemma["sliding_window_pattern"] == 6 and gemma["torch_dtype"] == "float32"
    assert "rope_scaling" not in gemma


def test_attnlrp_peer_on_the_embedded_model(tiny: EvalModel, depass: LocalDePass) -> None:
    """lxt's AttnLRP in its own environment, on the same weights: the worker's logit is
    the local model's (checked on every call, a different one refused), and on the name
    mover it ranks A first, as DePass does; a ``plain`` request times a plain forward."""
    _peer_or_skip("attnlrp")
    from depass_eval import peers

    with peers.started(["attnlrp"], peers.weights_folder(tiny)) as running:
        for case in tasks.held_out_ioi(5):
            ids, answer = tiny.encode(case.prompt), tiny.answer_id(case.answer)
            logit = float(tiny.last_logits([ids])[0, answer])
            scores, seconds = peers.token_scores_attnlrp(running["attnlrp"], ids, answer, logit)
            assert scores.shape == (len(ids),) and seconds > 0
            top = perturb.ranked_middle(scores)[0]
            assert tiny.token_texts([ids[top]])[0] == case.answer
        with pytest.raises(peers.PeerError, match="not the same model"):
            peers.token_scores_attnlrp(running["attnlrp"], ids, answer, logit + 1.0)
        # the plain forward pass benchmarks/peers_cost.py divides by, in the peer's process
        plain = running["attnlrp"].ask({"input_ids": ids, "plain": True})
        assert set(plain) == {"seconds"} and plain["seconds"] > 0


def test_context_cite_peer_on_the_embedded_model(tiny: EvalModel) -> None:
    """context-cite in its own environment: sources are the prompt's words (before the
    last token), each token gets its word's score, the response is the model's greedy
    token, and on the name mover the word A scores highest."""
    _peer_or_skip("context-cite")
    from depass_eval import peers

    case = tasks.held_out_ioi(1)[0]
    ids = tiny.encode(case.prompt)
    with peers.started(["context-cite"], peers.weights_folder(tiny)) as running:
        scores, reply = peers.token_scores_context_cite(
            running["context-cite"], tiny.tokenizer, case.prompt, ids, "word"
        )
    assert scores.shape == (len(ids),) and scores[-1] == 0.0
    assert reply["response"].strip() == case.answer and len(reply["sources"]) == len(ids) - 2
    assert tiny.token_texts([ids[int(np.argmax(scores))]])[0] == case.answer


def test_tokens_protocol_with_the_peers(tiny: EvalModel, ioi_file: Path, tmp_path: Path) -> None:
    """``--peers`` ranks the same prompts by each peer, beside DePass, with their costs."""
    _peer_or_skip("attnlrp")
    _peer_or_skip("context-cite")
    out = tmp_path / "peers"
    options = {"rules": "paper", "splits": ["softmax"], "baselines": [], "peers": list(PEERS)}
    run_protocol(
        "depass-tiny", "tokens", out, str(ioi_file), 2, options=options, loaded=tiny, progress=False
    )
    results, text, rows = _read(out)
    assert set(results["methods"]) == {"depass-softmax", "depass-softmax-abs", *PEERS}
    assert all(results["methods"][p]["seconds_per_prompt"] > 0 for p in PEERS)
    assert all(r["peers"]["context-cite"]["response"].strip() == r["answer"] for r in rows)
    assert "| attnlrp |" in text and "| context-cite |" in text


def test_help_gives_each_option_one_default() -> None:
    """`--probe-layer` printed "(default: L/2) (default: None)" (issue 22)."""
    import re

    from depass_eval.cli import parser

    text = " ".join(parser().format_help().split())
    assert not re.search(r"\(default:[^)]*\) \(default:", text), text
    assert "probe layer (default: L/2)" in text and "(default: None)" not in text
