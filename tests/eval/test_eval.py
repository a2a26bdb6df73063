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
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from depass_eval import perturb, run_protocol
from depass_eval.cli import main as cli_main
from depass_eval.data import Case
from depass_eval.hooks import gradient_x_activation, masked, masked_logits
from depass_eval.model import EvalModel, load_model
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
    return EvalModel(*load_model(str(TINY)), name="depass-tiny")


@pytest.fixture(scope="module")
def depass(tiny: EvalModel) -> LocalDePass:
    return LocalDePass(engine=DePassEngine(tiny.model, tiny.tokenizer))


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


# ---------------------------------------------------------------------------- protocol 3


def test_masking_hooks_change_exactly_what_they_mask(tiny: EvalModel) -> None:
    ids = tiny.encode(tasks.held_out_ioi(1)[0].prompt)
    plain = tiny.last_logits([ids])[0]
    layers, heads, width = tiny.num_layers, tiny.num_heads, tiny.intermediate_size
    head_keep = torch.ones(3, layers, heads)
    head_keep[1, 2, 1] = 0.0  # row 1: one head zeroed
    neuron_keep = {layers - 1: torch.ones(3, width)}
    neuron_keep[layers - 1][2, :] = 0.0  # row 2: the last MLP zeroed
    logits = masked_logits(tiny, ids, head_keep, neuron_keep)
    torch.testing.assert_close(logits[0], plain, rtol=1e-5, atol=1e-5)  # nothing masked
    assert (logits[1] - plain).abs().max() > 1e-3
    # the last MLP zeroed = the model with that MLP's output removed, computed by hand
    captured: dict[str, torch.Tensor] = {}
    mlp = tiny.down_projection(layers - 1)
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
    assert neurons[tiny.num_layers - 1].shape == (tiny.intermediate_size,)
    assert torch.isfinite(heads).all() and heads.abs().sum() > 0


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


def test_help_gives_each_option_one_default() -> None:
    """`--probe-layer` printed "(default: L/2) (default: None)" (issue 22)."""
    import re

    from depass_eval.cli import parser

    text = " ".join(parser().format_help().split())
    assert not re.search(r"\(default:[^)]*\) \(default:", text), text
    assert "probe layer (default: L/2)" in text and "(default: None)" not in text
