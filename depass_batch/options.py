"""Where a Ray actor pool runs and how wide it is: :class:`RayOptions`, and the command
line options that set it (``depass-batch`` and ``depass-eval`` share them).

Nothing here imports Ray or pyarrow, so that a command can parse its options without
them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

#: The environment of a local cluster, set before Ray is imported (its processes inherit
#: it): a single-node cluster, which Ray keeps on 127.0.0.1 (else it swaps 127.0.0.1 for
#: the machine's outward address), and no usage reports to Ray's servers.
LOCAL_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray Data actor pool is.

    Args:
        address: ``None`` starts a local cluster on 127.0.0.1 (as many CPUs as this
            machine); ``auto`` joins the running one; ``ray://host:10001`` a remote one.
        actors: actors in the pool, one engine each.
        cpus_per_actor: CPUs each actor reserves (fractional: Ray Data's own tasks need
            the rest).
        gpus_per_actor: GPUs each actor reserves (``1``: one replica per GPU).
        start_timeout_s: fail when the pool's actors have not all started by then.
    """

    address: str | None = None
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    start_timeout_s: int = 300


def add_ray_arguments(parser: argparse._ActionsContainer, what: str) -> None:
    """``--ray [ADDRESS]``, ``--actors``, ``--cpus-per-actor``, ``--gpus-per-actor`` and
    ``--start-timeout`` on ``parser`` (a parser or an argument group); ``what`` says what
    each actor holds."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="Run on a Ray Data actor pool: no ADDRESS starts a local cluster on "
        "127.0.0.1; 'auto' joins the running one; 'ray://host:10001' a remote one.",
    )
    parser.add_argument(
        "--actors", type=int, default=2, help=f"Actors on Ray, each with {what} (default 2)."
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=0.5,
        help="CPUs each actor reserves (default 0.5: a pool may not take every CPU).",
    )
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor.")
    parser.add_argument(
        "--start-timeout", type=int, default=300, help="Seconds for the actors to start."
    )


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The pool that parsed ``add_ray_arguments`` options ask for (None: no ``--ray``).

    Raises:
        ValueError: fewer than one actor.
    """
    if args.ray is None:
        return None
    if args.actors < 1:
        raise ValueError("--actors must be at least 1")
    return RayOptions(
        address=None if args.ray == "local" else args.ray,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        start_timeout_s=args.start_timeout,
    )
