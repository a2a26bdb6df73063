"""AttnLRP (the peer, through lxt) against DePass's reverse mode, in the same run (CPU).

    python benchmarks/peers_cost.py                          # SmolLM2, N = 64, 256, 1024
    python benchmarks/peers_cost.py --sizes 64 --forward-sizes 64 --repeats 1

AttnLRP's efficient mode is input x gradient through a backward pass with modified rules
(one forward, one backward); DePass's reverse mode (``mlp_split="taylor"``,
``strategy="reverse"``) is also one frozen forward pass and one backward pass. Both give
every token's score for one target. On prompts of ``--sizes`` tokens, the tail of a text
made of LongRA's contexts (each completed with its answer) ending with one unanswered
LongRA prompt, this times, for the last position's top-1 token:

- ``attnlrp``: the peer's worker (``depass_eval/peers/lxt_worker.py``, in its own
  environment ``build/peers/lxt``: torch 2.6, transformers 4.52.4, lxt 2.1, on the same
  saved weights), the seconds it reports for the attribution itself (embedding, forward,
  backward, the sum over the hidden axis; no process start, no model load, no JSON);
- ``reverse``: DePass token scores, reverse mode, last position (no trace cache);
- ``forward``: DePass token scores, forward strategy, softmax split (the paper's rule),
  at ``--forward-sizes`` only (it is slow);
- ``plain``: one plain forward pass of the model on the same ids (no gradient, the last
  position's logits), the unit; ``peer-plain`` the same in the peer's environment.

Every method runs one warm-up, then ``--repeats`` timed runs, the methods' order reversed
on every other round; medians are printed. One torch thread in each process. Peak memory:
the process's peak resident set during a run (``VmHWM``, reset through
``/proc/PID/clear_refs`` before each run) above its resident set once the model was
loaded and had run one plain forward pass on 16 tokens (so the weights, which may be
mapped from their file until first read, are not counted), the largest over the runs;
this process hands freed memory back to the system (``malloc_trim``) before each of its
runs, so a method is not charged for memory an earlier one left in the allocator. The worker is not
trimmed: run the sizes in increasing order (the default) so that what an earlier size
left is below the current one's peak (its ``peer-plain`` figure is what the AttnLRP runs
left there, not the plain pass's need).

Side facts: the Spearman correlation of the token scores (tokens 0..N-2, the ones the
token protocol ranks) between the methods, signed and of the absolute values, how many
of their 10 highest-scored tokens they share, and AttnLRP's relevance sum over the logit
(DePass's scores plus its remainder add up to the logit). Output: one JSON line per
size, then the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from depass_eval import peers  # noqa: E402
from engine import AttributionRequest, DePassEngine  # noqa: E402

LONGRA = REPO / "data" / "eval" / "LongRA.json"


def model_path(name: str) -> str:
    if name != "smollm2":
        return name
    import real_models

    return str(real_models.gguf_path("smollm2"))


def longra_text() -> str:
    """LongRA's contexts, each completed with its answer, one category after the other in
    turn, then the first record's prompt without its answer (the question)."""
    records = json.loads(LONGRA.read_text(encoding="utf-8"))
    question, rest = records[0], records[1:]
    by_category: dict[str, list[dict[str, Any]]] = {}
    for record in rest:
        by_category.setdefault(record["category"], []).append(record)
    turns = max(len(v) for v in by_category.values())
    ordered = [v[i] for i in range(turns) for v in by_category.values() if i < len(v)]
    filler = [f"{r['prompt']} {r['target_token']}." for r in ordered[:60]]
    return "\n".join([*filler, question["prompt"]])


def prompt_ids(engine: DePassEngine, length: int) -> list[int]:
    ids = engine.tokenize(longra_text())
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {length}")
    return ids[-length:]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def trim() -> None:
    """Hand the memory free in this process's allocator back to the system (glibc)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(pid: int) -> bool:
    """Reset ``pid``'s peak resident set (Linux: ``5`` into ``clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Method:
    """One timed method: its runs' seconds, its peak memory above ``loaded_kib`` (the
    process's resident set with the model loaded) and its last output."""

    def __init__(
        self, name: str, pid: int, loaded_kib: int, run: Callable[[], tuple[float, Any]]
    ) -> None:
        self.name, self.pid, self.loaded_kib, self.run = name, pid, loaded_kib, run
        self.seconds: list[float] = []
        self.rise_kib = 0
        self.memory = True
        self.output: Any = None

    def once(self, timed: bool) -> None:
        if self.pid == os.getpid():
            trim()
        self.memory = reset_peak(self.pid) and self.memory
        seconds, self.output = self.run()
        self.rise_kib = max(self.rise_kib, status_kib(self.pid, "VmHWM") - self.loaded_kib)
        if timed:
            self.seconds.append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def wall(fn: Callable[[], Any]) -> Callable[[], tuple[float, Any]]:
    def run() -> tuple[float, Any]:
        clock = time.perf_counter()
        out = fn()
        return time.perf_counter() - clock, out

    return run


def measure(
    engine: DePassEngine,
    worker: peers.PeerProcess,
    loaded_kib: dict[int, int],
    size: int,
    repeats: int,
    with_forward: bool,
) -> dict[str, Any]:
    ids = prompt_ids(engine, size)
    batch = torch.tensor([ids])
    with torch.no_grad():
        logits = engine.model(batch, use_cache=False, logits_to_keep=1).logits[0, -1]
    target = int(logits.argmax())
    logit = float(logits[target])

    def depass(strategy: str, split: str) -> np.ndarray:
        request = AttributionRequest(
            input_ids=ids,
            granularity="token",
            mlp_split=split,
            strategy=strategy,
            positions=[-1],
            targets=[target],
        )
        result = engine.attribute(request)
        return result.scores[0, :, 0].double().numpy()

    def plain() -> None:
        with torch.no_grad():
            engine.model(batch, use_cache=False, logits_to_keep=1)

    def attnlrp() -> tuple[float, Any]:
        clock = time.perf_counter()
        scores, seconds = peers.token_scores_attnlrp(worker, ids, target, logit)
        return seconds, (scores, time.perf_counter() - clock)

    def peer_plain() -> tuple[float, Any]:
        return float(worker.ask({"input_ids": ids, "plain": True})["seconds"]), None

    me, peer = os.getpid(), worker.pid
    methods = [
        Method("plain", me, loaded_kib[me], wall(plain)),
        Method("attnlrp", peer, loaded_kib[peer], attnlrp),
        Method("reverse", me, loaded_kib[me], wall(lambda: depass("reverse", "taylor"))),
        Method("peer-plain", peer, loaded_kib[peer], peer_plain),
    ]
    if with_forward:
        forward = wall(lambda: depass("forward", "softmax"))
        methods.append(Method("forward", me, loaded_kib[me], forward))
    for round_ in range(1 + repeats):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            method.once(timed=round_ > 0)
    by = {m.name: m for m in methods}
    unit = by["plain"].median
    out: dict[str, Any] = {"tokens": size, "target": target, "logit": logit}
    for method in methods:
        out[f"{method.name}_s"] = method.median
        out[f"{method.name}_runs_s"] = method.seconds
        out[f"{method.name}_over_plain"] = method.median / unit
        if method.memory:
            out[f"{method.name}_peak_above_model_mib"] = method.rise_kib / 1024
    out["peer_plain_over_plain"] = by["peer-plain"].median / unit
    out["attnlrp_over_reverse"] = by["attnlrp"].median / by["reverse"].median
    lrp, lrp_wall = by["attnlrp"].output
    out["attnlrp_call_wall_s"] = lrp_wall
    out["attnlrp_sum_over_logit"] = float(lrp.sum() / logit)
    scores = {"attnlrp": lrp, "reverse": by["reverse"].output}
    if with_forward:
        scores["forward"] = by["forward"].output
    ranked = slice(0, size - 1)  # the last token is not ranked by the token protocol
    names = list(scores)
    for i, a in enumerate(names):
        out[f"top1_{a}"] = int(np.argmax(scores[a][ranked]))
        for b in names[i + 1 :]:
            x, y = scores[a][ranked], scores[b][ranked]
            out[f"spearman_{a}_{b}"] = float(spearmanr(x, y).statistic)
            out[f"spearman_abs_{a}_{b}"] = float(spearmanr(abs(x), abs(y)).statistic)
            top = min(10, size - 1)
            common = set(np.argsort(-x)[:top]) & set(np.argsort(-y)[:top])
            out[f"top{top}_common_{a}_{b}"] = len(common)
    return out


def seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 10 else f"{value:.1f} s"


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "-s") else ""),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_at_start": os.getloadavg(),
        "nice": os.nice(0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, or a model path")
    parser.add_argument("--sizes", default="64,256,1024")
    parser.add_argument("--forward-sizes", default="64", help="sizes with DePass forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--show", default=None, help="print the tables of a --json file")
    args = parser.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text(encoding="utf-8"))
        tables(saved["machine"], saved["rows"])
        return
    torch.set_num_threads(1)
    facts = machine()
    print(json.dumps(facts), flush=True)
    engine = DePassEngine.from_pretrained(model_path(args.model), trace_cache_size=0)
    folder = Path(engine.model.name_or_path).resolve()
    if not (folder / "config.json").exists():
        raise SystemExit(f"the peer needs the model's folder; {folder} has no config.json")
    why = peers.PEERS["attnlrp"].missing()
    if why:
        raise SystemExit(why)
    forward_sizes = {int(n) for n in args.forward_sizes.split(",") if n}
    results = []
    with peers.started(["attnlrp"], folder, threads=1) as running:
        worker = running["attnlrp"]
        # the weights may be mapped from their file: one plain forward pass in each
        # process brings them all in before the resident sets are read
        ids = prompt_ids(engine, 16)
        with torch.no_grad():
            engine.model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        worker.ask({"input_ids": ids, "plain": True})
        trim()
        loaded = {pid: status_kib(pid, "VmRSS") for pid in (os.getpid(), worker.pid)}
        facts["model_loaded_rss_mib"] = {"depass": loaded[os.getpid()] / 1024}
        facts["model_loaded_rss_mib"]["attnlrp"] = loaded[worker.pid] / 1024
        for size in (int(n) for n in args.sizes.split(",")):
            out = measure(engine, worker, loaded, size, args.repeats, size in forward_sizes)
            print(json.dumps(out), flush=True)
            results.append(out)
    facts["load_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "rows": results}, indent=1))
    tables(facts, results)


def tables(facts: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The tables of a run (``--show`` prints them again from its ``--json`` file)."""
    print(f"\nload average at start {facts['load_at_start']}, at end {facts['load_at_end']}")
    if "model_loaded_rss_mib" in facts:
        rss = facts["model_loaded_rss_mib"]
        print(f"resident set with the model loaded (MiB): {rss}")
    print(
        "\n| N | plain forward | AttnLRP (lxt) | DePass reverse | DePass forward (softmax)"
        " | AttnLRP / reverse | peak memory above the model, AttnLRP / reverse / forward"
        " | Spearman AttnLRP-reverse |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for out in results:
        unit = out["plain_s"]

        def cell(name: str, row: dict[str, Any] = out, unit: float = unit) -> str:
            if f"{name}_s" not in row:
                return "-"
            return f"{seconds(row[f'{name}_s'])} ({row[f'{name}_s'] / unit:.1f}x)"

        memory = " / ".join(
            f"{out[key]:.0f}" if key in out else "-"
            for key in (f"{m}_peak_above_model_mib" for m in ("attnlrp", "reverse", "forward"))
        )
        print(
            f"| {out['tokens']} | {seconds(unit)} | {cell('attnlrp')} | {cell('reverse')}"
            f" | {cell('forward')} | {out['attnlrp_over_reverse']:.2f} | {memory} MiB"
            f" | {out['spearman_attnlrp_reverse']:.2f} |"
        )
    print(
        "\n| N | plain forward, peer's environment | AttnLRP call, wall | top-ranked position"
        " AttnLRP / reverse | top 10 shared | Spearman of abs. values AttnLRP-reverse"
        " | AttnLRP sum / logit | Spearman forward-reverse, forward-AttnLRP |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for out in results:
        forward = "-"
        if "spearman_reverse_forward" in out:
            forward = (
                f"{out['spearman_reverse_forward']:.2f}, {out['spearman_attnlrp_forward']:.2f}"
            )
        print(
            f"| {out['tokens']} | {seconds(out['peer-plain_s'])}"
            f" ({out['peer_plain_over_plain']:.2f}x ours) | {seconds(out['attnlrp_call_wall_s'])}"
            f" | {out['top1_attnlrp']} / {out['top1_reverse']}"
            f" | {out.get('top10_common_attnlrp_reverse', '-')}"
            f" | {out.get('spearman_abs_attnlrp_reverse', float('nan')):.2f}"
            f" | {out['attnlrp_sum_over_logit']:.2f} | {forward} |"
        )


if __name__ == "__main__":
    main()
