"""The ``depass`` command line: attribute, generate, next-tokens, tokenize, model, health.

``depass attribute "The capital of France is" --granularity head --layer 1`` prints the top
components with their scores (the tokens coloured by score on a terminal; one table per
layer for ``--layer 1,2,3``); ``--chat`` sends the prompt as a user message in the
model's chat template; ``--json`` prints the whole result for scripts. ``--base-url``
and ``--api-key`` fall back to ``DEPASS_BASE_URL`` and ``DEPASS_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal, TextIO

from depass_client._base import __version__
from depass_client._client import Client
from depass_client._errors import APIStatusError, DePassError
from depass_client._params import GRANULARITIES, STRATEGIES
from depass_client._types import Attribution

#: 256-colour shades, faint to strong: red raises the target's logit, blue lowers it (the
#: convention of the viewer, the HTML view and the plots: ColorBrewer's RdBu).
_REDS = (181, 174, 167, 160, 196)
_BLUES = (153, 110, 68, 26, 21)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _layer(text: str) -> int | list[int]:
    values = _int_list(text)
    if not values:
        raise argparse.ArgumentTypeError("expected a layer number")
    return values[0] if len(values) == 1 and "," not in text else values


def _target(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (connection options work before or after the command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=argparse.SUPPRESS,
        help="service URL (default: $DEPASS_BASE_URL, else http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="bearer key (default: $DEPASS_API_KEY)"
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds per attempt"
    )
    chat = argparse.ArgumentParser(add_help=False)
    chat.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message, in the model's chat template",
    )
    chat.add_argument("--system", default=None, help="a system message before it (with --chat)")
    parser = argparse.ArgumentParser(
        prog="depass", description="Command line of DePass Serve.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"depass {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    attribute = commands.add_parser(
        "attribute", parents=[common, chat], help="attribute the next token of a prompt"
    )
    attribute.add_argument("prompt")
    attribute.add_argument(
        "--granularity",
        default="token",
        choices=[g for g in GRANULARITIES if g != "subspace"],  # subspaces need an array
    )
    attribute.add_argument(
        "--layer", type=_layer, default=None, help="start layer (head, neuron, module: also 1,2,3)"
    )
    attribute.add_argument("--end-layer", type=int, default=None)
    attribute.add_argument("--module", choices=["attn", "mlp"], default=None)
    attribute.add_argument("--neurons", type=_int_list, default=None, help="e.g. 3,17,42")
    attribute.add_argument("--split", default=None, help="MLP split rule (default softmax)")
    attribute.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="reverse: every score from one gradient (--split taylor); default auto",
    )
    attribute.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="the service returns only the k largest |score| components",
    )
    attribute.add_argument(
        "--target", type=_target, default=None, help="token (text or id); default top-1"
    )
    attribute.add_argument("--position", type=int, default=-1, help="token position")
    attribute.add_argument("--top", type=int, default=10, help="components to show")
    attribute.add_argument("--json", action="store_true", help="print the full result")
    attribute.add_argument(
        "--html", metavar="PATH", default=None, help="also write a self-contained HTML view"
    )

    generate = commands.add_parser(
        "generate", parents=[common, chat], help="generate and attribute each new token"
    )
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=8)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--top", type=int, default=3, help="contributors per token")
    generate.add_argument("--json", action="store_true")

    next_tokens = commands.add_parser(
        "next-tokens", parents=[common], help="the model's most likely next tokens"
    )
    next_tokens.add_argument("prompt")
    next_tokens.add_argument(
        "--positions", type=_int_list, default=None, help="e.g. -1 or 2,5 (default: the last)"
    )
    next_tokens.add_argument("--top-k", type=int, default=None, help="tokens per position (5)")
    next_tokens.add_argument("--json", action="store_true")

    tokenize = commands.add_parser("tokenize", parents=[common], help="show token ids")
    tokenize.add_argument("text")
    tokenize.add_argument("--json", action="store_true")

    model = commands.add_parser("model", parents=[common], help="the model and limits")
    model.add_argument("--json", action="store_true")

    commands.add_parser("health", parents=[common], help="liveness of the service")
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (1: the service refused or failed)."""
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    options: dict[str, Any] = {
        "base_url": getattr(args, "base_url", None),
        "api_key": getattr(args, "api_key", None),
    }
    if hasattr(args, "timeout"):
        options["timeout"] = args.timeout
    try:
        with Client(**options) as client:
            return _COMMANDS[args.command](client, args, out)
    except APIStatusError as exc:
        print(f"depass: error {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    except DePassError as exc:
        print(f"depass: error: {exc}", file=sys.stderr)
        return 1


def _input(args: argparse.Namespace) -> dict[str, Any]:
    """The request's input: the prompt, or with ``--chat`` a chat of it."""
    if not args.chat:
        if args.system is not None:
            raise DePassError("--system needs --chat")
        return {"prompt": args.prompt}
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return {"messages": [*system, {"role": "user", "content": args.prompt}]}


def _attribute(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    module: Literal["attn", "mlp"] | None = args.module
    if args.granularity == "module" and module is None:
        module = "attn"
    result = client.attribute(  # None: the service's default
        **_input(args),
        granularity=args.granularity,
        start_layer=args.layer,
        end_layer=args.end_layer,
        module=module,
        neurons=args.neurons,
        mlp_split=args.split,
        strategy=args.strategy,
        top_k=args.top_k,
        targets=None if args.target is None else [args.target],
        positions=[args.position],
        outputs=["scores"],
        array_encoding="list" if args.json else None,
    )
    if args.html:
        with open(args.html, "w", encoding="utf-8") as page:
            page.write(result.to_html())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), file=out)
        return 0
    colour = _wants_colour(out)
    layer = "" if args.layer is None else f", layer {args.layer}"
    how = ", strategy reverse" if result.strategy == "reverse" else ""
    print(f"model {result.model}, granularity {result.granularity}{layer}{how}", file=out)
    print("tokens: " + _tokens_line(result, colour), file=out)
    # one table per layer of a list of head layers, each with that layer's labels
    tables = [-1] if result.layers is None else list(range(len(result.layers)))
    print(
        "\n".join(result.table(k=args.top, position=-1, target=0, layer=i) for i in tables),
        file=out,
    )
    return 0


def _generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    result = client.generate(
        **_input(args),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        array_encoding="list" if args.json else None,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), file=out)
    else:
        print(result.table(k=args.top), file=out)
    return 0


def _next_tokens(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    result = client.next_tokens(args.prompt, positions=args.positions, top_k=args.top_k)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2), file=out)
    else:
        print(result.table(), file=out)
    return 0


def _tokenize(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    result = client.tokenize(args.text)
    if args.json:
        print(json.dumps({"input_ids": result.input_ids, "tokens": result.tokens}), file=out)
        return 0
    print(f"{result.num_tokens} tokens", file=out)
    for position, (token_id, token) in enumerate(zip(result.input_ids, result.tokens, strict=True)):
        print(f"{position:>5}  {token_id:>8}  {token!r}", file=out)
    return 0


def _model(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    card = client.model()
    if args.json:
        print(json.dumps(card.__dict__, indent=2), file=out)
        return 0
    for key, value in card.__dict__.items():
        if key != "limits":
            print(f"{key:>18}  {value}", file=out)
    for key, value in card.limits.items():
        print(f"{key:>18}  {value}", file=out)
    return 0


def _health(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    print(json.dumps(client.health()), file=out)
    return 0


_COMMANDS = {
    "attribute": _attribute,
    "generate": _generate,
    "next-tokens": _next_tokens,
    "tokenize": _tokenize,
    "model": _model,
    "health": _health,
}


def _wants_colour(out: TextIO) -> bool:
    return out.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _tokens_line(result: Attribution, colour: bool) -> str:
    """The input tokens; coloured by their score when the components are the tokens."""
    texts = [token.strip() or repr(token) for token in result.tokens]
    is_tokens = result.granularity == "token" and len(result.components) == len(texts)
    if not colour or not is_tokens or result.scores is None:
        return " ".join(texts)
    row = result.scores if result.layers is None else result.scores[-1]
    present = set(result.present(-1).tolist())  # later tokens stay uncoloured
    scores = [float(s) if m in present else 0.0 for m, s in enumerate(row[-1, :, 0])]
    largest = max(abs(s) for s in scores) or 1.0
    painted = []
    for text, score in zip(texts, scores, strict=True):
        shades = _REDS if score >= 0 else _BLUES
        shade = shades[min(len(shades) - 1, int(len(shades) * abs(score) / largest))]
        painted.append(f"\x1b[1;38;5;{shade}m{text}\x1b[0m")
    return " ".join(painted) + "  (red raises the target's logit, blue lowers it)"


if __name__ == "__main__":
    sys.exit(main())
