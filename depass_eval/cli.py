"""``depass-eval``: run one protocol of the paper's evaluation on one model and data set.

Examples::

    depass-eval --model models/depass-tiny --protocol tokens --dataset ioi --size 200 \\
        --out results/tiny-ioi
    depass-eval --model /models/SmolLM2-135M-Instruct.Q4_1.gguf --protocol components \\
        --dataset counterfact --size 200 --out results/smollm2/components-counterfact
    depass-eval --url http://127.0.0.1:8000 --model <the served weights> ...   # DePass by HTTP
    depass-eval --model models/depass-tiny --protocol tokens --ray --actors 2 ...  # on Ray

Stop it at any time; the same command with the same ``--out`` carries on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from depass_batch.options import add_ray_arguments, ray_options
from depass_eval import PROTOCOLS, run_protocol


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to each option's help once: not where the help already says
    its default (one computed when the value is None, e.g. L/2), nor for None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="depass-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--model", required=True, help="model folder, hub id or .gguf file")
    p.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    p.add_argument(
        "--dataset",
        default=None,
        help="data set name (known, ioi, longra, counterfact, ioi-component) or a JSON file;"
        " protocols truth and language use their own files",
    )
    p.add_argument("--size", type=int, default=200, help="prompts to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--url", default=None, help="a running DePass service: DePass by HTTP")
    p.add_argument("--api-key", default=None, help="the service's key (or DEPASS_API_KEY)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("Ray (protocols tokens, components)")
    add_ray_arguments(g, "the model, its engine and the baselines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from rows.jsonl")
    p.add_argument(
        "--rules",
        choices=["strict", "paper"],
        default="strict",
        help="the suite's strict protocol, or the paper's as its public scripts run it"
        " (docs/evaluation.md)",
    )
    g = p.add_argument_group("protocol tokens")
    g.add_argument("--splits", default="softmax,relu,max,linear,taylor", help="DePass split rules")
    g.add_argument("--temperatures", default="0.1", help="softmax temperatures")
    g.add_argument("--first-token-rule", choices=["on", "off", "both"], default="on")
    g.add_argument(
        "--margin",
        choices=["on", "off", "both"],
        default="off",
        help="DePass scores the answer's logit minus a competitor's (on), or the answer's"
        " logit (off)",
    )
    g.add_argument(
        "--margin-against",
        choices=["runner-up", "other-name"],
        default="runner-up",
        help="the competitor: the model's runner-up token, or the prompt's other name (IOI)",
    )
    g.add_argument(
        "--baselines",
        default="default",
        help="'default' (strict: all; paper: the paper's, no occlusion), 'all', 'none' or a"
        " comma list",
    )
    g.add_argument(
        "--peers",
        default="",
        help="peer methods run in their own environments (make peers): attnlrp,context-cite",
    )
    g.add_argument(
        "--ig-steps",
        type=int,
        default=None,
        help="integrated-gradients steps (default: 16 Gauss-Legendre strict, 100 Riemann paper)",
    )
    g.add_argument(
        "--tuning-slice",
        action="store_true",
        help="take prompts from the end of the seeded order (disjoint from the test prompts)",
    )
    g.add_argument(
        "--exclude", type=Path, action="append", default=[], help="skip the prompts of this run"
    )
    g = p.add_argument_group("protocols components, truth, language")
    g.add_argument("--head-ks", default="1,3,5,10,20", help="heads zeroed")
    g.add_argument("--neuron-ks", default="1,5,10,50,100", help="neurons zeroed")
    g.add_argument(
        "--neuron-layers",
        default=None,
        help="layers whose neurons are ranked (negative: from the top); default: the last"
        " two (strict), all (paper)",
    )
    g.add_argument(
        "--component-split",
        default=None,
        help="components: the DePass split rule of the head and neuron runs (default: the"
        " engine's, softmax; the first of --temperatures)",
    )
    g.add_argument(
        "--neuron-split",
        default=None,
        help="components: the DePass split rule of the neuron ranking (default: taylor"
        " under --rules paper, every layer by reverse mode; else --component-split's)",
    )
    g.add_argument("--probe-layer", type=int, default=None, help="probe layer (default: L/2)")
    g.add_argument("--split-layer", type=int, default=None, help="language split layer")
    g.add_argument("--probe-size", type=int, default=None, help="probe texts per split")
    return p


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol options of the parsed arguments."""
    from depass_eval.baselines import BASELINES

    chosen = {"all": list(BASELINES), "none": []}.get(args.baselines)
    if args.baselines == "default":
        chosen = None  # the rules' own set (protocols.tokens.baselines_of)
    elif chosen is None:
        chosen = [b.strip() for b in args.baselines.split(",") if b.strip()]
        unknown = [b for b in chosen if b not in BASELINES]
        if unknown:
            raise SystemExit(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)}")
    from depass_eval.peers import PEERS

    named = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in named):
        raise SystemExit(f"--peers: choose from {', '.join(PEERS)}; got {args.peers!r}")
    return {
        "rules": args.rules,
        "peers": named,
        "splits": [s.strip() for s in args.splits.split(",") if s.strip()],
        "temperatures": [float(t) for t in args.temperatures.split(",")],
        "first_token_rule": args.first_token_rule,
        "margin": args.margin,
        "margin_against": args.margin_against,
        "baselines": chosen,
        "ig_steps": args.ig_steps,
        "tuning_slice": args.tuning_slice,
        "exclude_runs": [str(p) for p in args.exclude],
        "head_ks": _ints(args.head_ks),
        "neuron_ks": _ints(args.neuron_ks),
        "neuron_layers": None if args.neuron_layers is None else _ints(args.neuron_layers),
        "component_split": args.component_split,
        "neuron_split": args.neuron_split,
        "probe_layer": args.probe_layer,
        "split_layer": args.split_layer,
        "probe_size": args.probe_size,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    run_protocol(
        model=args.model,
        protocol=args.protocol,
        dataset=args.dataset,
        size=args.size,
        seed=args.seed,
        out_dir=args.out,
        options=options_of(args),
        url=args.url,
        api_key=args.api_key,
        threads=args.threads,
        progress=not args.no_progress,
        report_only=args.report_only,
        argv=argv,
        ray=ray_options(args),
    )
    print(f"wrote {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
