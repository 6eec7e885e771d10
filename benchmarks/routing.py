"""Automatic routing (`adapters="auto"`), measured: routed exact match vs the oracle and the base,
fallback on general prompts, and what routing costs per request.

Held-out inputs (test split) with instructions phrased differently from training
(`adapterzoo.tasks.instructed_examples(..., held_out=True)`) on SmolLM2-135M-Instruct (CPU):

1. **Trained specialists** (default: the ones shipped in adapterzoo/specialists/, or --library DIR):
   exact match of the oracle (each input with its own task's adapter), of the bare base, and of
   each router's choice (prototype, Arrow), plus how often each router named the right adapter.
2. **Routing at scale** (--scale 32,116): the prototype router needs only routing examples, not
   trained weights, so N adapters with their tasks' training prompts as routing examples measure
   how often the right one is named among N (exact match needs N trained adapters: not measured).
3. **Fallback**: the share of general chat prompts (none of them in routing.BACKGROUND_PROMPTS)
   routed to the bare base.
4. **Cost**: the seconds `zoo.route` adds to one request, against the request itself
   (`zoo.generate` of 16 new tokens), interleaved round by round; medians and the ratio.

    python benchmarks/routing.py                       # shipped specialists
    python benchmarks/routing.py --scale 32,116 --n 10 # also routing accuracy among 32 and 116
    python benchmarks/routing.py --library lib116 --n 12  # a whole built library: results/routing_116.json
    python benchmarks/routing.py --against 9c4f77f     # cost A/B against routing.py at that commit
    python benchmarks/routing.py --cv                  # tune the choice on routing examples only
    python benchmarks/routing.py --held-out fresh      # test on the fresh held-out set (never tune on it)

--held-out picks the test instructions: `paraphrases` (default) are the held-out paraphrases the
router was tuned while reading; `fresh` is the second set written on 2026-12-02 by someone not
tuning the router (`adapterzoo.tasks._FRESH_PHRASINGS`), the honest test. Results on `fresh` go to
their own file (suffix `_fresh`).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_json  # noqa: E402

from adapterzoo import Zoo  # noqa: E402
from adapterzoo.demo import SPECIALISTS  # noqa: E402
from adapterzoo.formats.native import CONFIG_FILE  # noqa: E402
from adapterzoo.library import exact_match, finished  # noqa: E402
from adapterzoo.routing import BACKGROUND_PROMPTS, DEFAULT_ENCODER, route  # noqa: E402
from adapterzoo.tasks import all_tasks, get_task, instructed_examples, routing_examples  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROUTERS = ("prototype", "arrow")
#: --held-out choice -> the `held_out` argument of `instructed_examples` for the test prompts
HELD_OUT_SETS = {"paraphrases": True, "fresh": "fresh"}

GENERAL_PROMPTS = [
    "What should I cook for dinner tonight?",
    "How do airplanes stay in the air?",
    "Tell me about the Eiffel Tower.",
    "Can you help me write an email to my boss?",
    "What is the meaning of life?",
    "Who painted the Mona Lisa?",
    "How many legs does a spider have?",
    "What's a fun weekend activity for kids?",
    "Explain how vaccines work.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a virus and a bacterium?",
    "How do I change a flat tire?",
    "Give me a motivational quote.",
    "What are black holes?",
    "Suggest a movie for a rainy evening.",
    "How does the stock market work?",
    "What language is spoken in Brazil?",
    "Why do cats purr?",
    "How can I learn to play the guitar?",
    "What is the tallest mountain in the world?",
    "Plan a three-day trip to Rome.",
    "What is machine learning?",
    "How do I keep my houseplants alive?",
    "Describe the taste of a mango.",
    "What year did the first moon landing happen?",
    "Is coffee bad for you?",
    "How do I say thank you in Japanese?",
    "What causes thunderstorms?",
    "Write a limerick about a dog.",
    "What's the best way to study for an exam?",
    "import numpy as np",
    "The quarterly report shows that",
    "Once upon a time in a small village,",
    "Please summarize this article for me.",
    "What is your favourite food?",
    "How do magnets work?",
    "Recommend some podcasts about history.",
    "What are the symptoms of the flu?",
    "Convert 10 miles to kilometers.",
    "Good evening! What can you do?",
]


def load_library(zoo: Zoo, folder: Path) -> dict[str, object]:
    tasks = {}
    for path in sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}")):
        if finished(path) is None:
            continue
        zoo.load_adapter(path.name, path)
        tasks[path.name] = get_task(zoo.find_adapter(path.name).metadata.get("task", path.name))
    return tasks


def trained(
    zoo: Zoo,
    tasks: dict,
    n: int,
    layer: int | None,
    methods: tuple[str, ...] = ROUTERS,
    held_out: bool | str = True,
) -> dict:
    names = list(tasks)
    data = {name: instructed_examples(task, n, "test", seed=5, held_out=held_out) for name, task in tasks.items()}
    prompts = [ex.prompt for name in names for ex in data[name]]
    truth = [name for name in names for _ in data[name]]
    # each row group: (adapter or None, task, examples), and the task whose inputs they are
    rows = {
        "oracle": [(name, tasks[name], data[name]) for name in names],
        "base": [(None, tasks[name], data[name]) for name in names],
    }
    owners = {"oracle": names, "base": names}
    result = {"adapters": names, "n_per_task": n}
    for method in methods:
        start = time.perf_counter()
        options = {"layer": layer} if method == "prototype" else {}
        chosen = [d.adapter for d in route(zoo, prompts, method=method, **options)]
        result[f"{method}_route_s_per_prompt"] = (time.perf_counter() - start) / len(prompts)
        result[f"{method}_right_adapter"] = sum(c == t for c, t in zip(chosen, truth)) / len(truth)
        result[f"{method}_fell_back"] = sum(c is None for c in chosen) / len(truth)
        # what each misrouted task went to: the confusion list says which tasks to tell apart
        wrong = Counter((t, c) for c, t in zip(chosen, truth) if c != t)
        result[f"{method}_confusion"] = [
            {"task": t, "chosen": c, "count": k, "of": len(data[t])} for (t, c), k in wrong.most_common()
        ]
        # routed rows: each example with the adapter its router chose (or the base)
        per = {}
        for (c, name), ex in zip(zip(chosen, truth), [ex for task in names for ex in data[task]]):
            per.setdefault((c, name), []).append(ex)
        rows[method] = [(c, tasks[name], exs) for (c, name), exs in per.items()]
        owners[method] = [name for _, name in per]
    scores, per_task = {}, {name: {} for name in names}
    for label, group in rows.items():
        ems = exact_match(zoo, group)
        hits = [em * len(exs) for em, (_, _, exs) in zip(ems, group)]
        scores[label] = sum(hits) / len(prompts)
        for name, h in zip(owners[label], hits):
            per_task[name][label] = per_task[name].get(label, 0.0) + h / len(data[name])
    result.update({f"{k}_exact_match": v for k, v in scores.items()})
    result["per_task"] = per_task
    # tasks whose specialist learned nothing (oracle 0) have no ratio: routing cannot lose there
    learned = [name for name in names if per_task[name]["oracle"] > 0]
    result["tasks_oracle_above_0"] = len(learned)
    for method in methods:
        result[f"{method}_vs_oracle"] = scores[method] / scores["oracle"] if scores["oracle"] else float("nan")
        ratios = [per_task[name][method] / per_task[name]["oracle"] for name in learned]
        result[f"{method}_vs_oracle_per_task_mean"] = statistics.mean(ratios) if ratios else float("nan")
    return result


def at_scale(base: str, size: int, n: int, layer: int | None, held_out: bool | str = True) -> dict:
    """Routing accuracy among `size` adapters that carry their tasks' routing examples."""
    zoo = Zoo.from_pretrained(base, device="cpu", slots=4)
    names = list(all_tasks())[:size] if size >= len(all_tasks()) else _spread(size)
    start = time.perf_counter()
    for name in names:
        zoo.add_adapter(name, "lora", r=1, target_modules=["q_proj"], layers_to_transform=[0], trainable=False)
        zoo.add_routing_examples(name, routing_examples(name, 24), layer=layer)
    setup = time.perf_counter() - start
    prompts, truth = [], []
    for name in names:
        for ex in instructed_examples(name, n, "test", seed=5, held_out=held_out):
            prompts.append(ex.prompt)
            truth.append(name)
    chosen = [d.adapter for d in route(zoo, prompts, layer=layer)]
    wrong_family = sum(c is not None and get_task(c).family != get_task(t).family for c, t in zip(chosen, truth))
    general = [d.adapter for d in route(zoo, GENERAL_PROMPTS, layer=layer)]
    return {
        "adapters": size,
        "n_per_task": n,
        "layer": layer,
        "prototype_seconds": round(setup, 1),
        "right_adapter": sum(c == t for c, t in zip(chosen, truth)) / len(truth),
        "fell_back": sum(c is None for c in chosen) / len(truth),
        "wrong_family": wrong_family / len(truth),
        "general_fallback": sum(c is None for c in general) / len(general),
    }


def _spread(size: int) -> list[str]:
    """`size` tasks taken evenly across families (so 32 is not just the Caesar shifts)."""
    by_family: dict[str, list[str]] = {}
    for task in all_tasks().values():
        by_family.setdefault(task.family, []).append(task.name)
    out: list[str] = []
    while len(out) < size:
        for family in list(by_family):
            if by_family[family] and len(out) < size:
                out.append(by_family[family].pop(0))
    return out


def cross_validate(sizes: dict[str, list[str]], shrinkages: tuple[float, ...] = (0.3, 0.5, 0.7)) -> dict:
    """How to choose among adapters, tuned on the *training* side only: leave one routing phrasing out.

    Each task's 24 routing examples cycle through its eight routing phrasings; fold j keeps the
    examples of the seven others as the adapters' examples and asks which adapter each of the three
    under phrasing j names (it fits a specialist: the fallback is not in question here). The held-out
    paraphrases are never read. Rows: the whole prompt (the router before), the instruction line,
    the instruction line whitened at each shrinkage (`routing._Chooser`), and the kept chooser: the line
    with its parts (`routing.ORDER_PARTS`), whitened."""
    from adapterzoo import routing
    from adapterzoo.tasks import routing_phrasings

    encoder = routing.SentenceEncoder("cpu", fast_dtype=torch.float32)
    names = sorted({name for group in sizes.values() for name in group})
    examples = {name: routing_examples(name, 24) for name in names}
    whole = dict(zip(names, encoder([p for name in names for p in examples[name]]).split(24)))
    lines = sorted({routing.instruction_of(p) for name in names for p in examples[name]})
    # one encoding: an ordered row begins with the plain features (SentenceEncoder, ordered=True)
    ordered_features = dict(zip(lines, encoder(lines, ordered=True)))
    ordered = {
        name: torch.stack([ordered_features[routing.instruction_of(p)] for p in examples[name]]) for name in names
    }
    instruction = {name: rows[:, : whole[name].shape[1]] for name, rows in ordered.items()}
    phrasings = {name: len(routing_phrasings(name)) for name in names}

    def nearest(per_adapter: list[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
        return routing._nearest_mean(queries @ torch.cat(per_adapter).T, routing._grouped(per_adapter)).argmax(1)

    def whitened(shrinkage: float):
        def choose(per_adapter: list[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
            kept, routing.WHITENING_SHRINKAGE = routing.WHITENING_SHRINKAGE, shrinkage
            try:
                return routing._Chooser(per_adapter).scores(queries).argmax(1)
            finally:
                routing.WHITENING_SHRINKAGE = kept

        return choose

    methods = {"whole prompt": (whole, nearest), "instruction line": (instruction, nearest)}
    methods.update({f"instruction line, whitened {s}": (instruction, whitened(s)) for s in shrinkages})
    # the kept chooser: order-aware features (routing.ORDER_PARTS), whitened at the kept shrinkage
    methods[f"instruction line and its {routing.ORDER_PARTS} parts, whitened {routing.WHITENING_SHRINKAGE}"] = (
        ordered,
        whitened(routing.WHITENING_SHRINKAGE),
    )
    table: dict[str, dict[str, float]] = {}
    for label, (feats, choose) in methods.items():
        for size, group in sizes.items():
            right = total = 0
            for fold in range(max(phrasings[name] for name in group)):
                keep = [[i for i in range(24) if i % phrasings[name] != fold] for name in group]
                ask = [[i for i in range(24) if i % phrasings[name] == fold] for name in group]
                chosen = choose(
                    [feats[n][k] for n, k in zip(group, keep)], torch.cat([feats[n][a] for n, a in zip(group, ask)])
                )
                truth = torch.tensor([g for g, a in enumerate(ask) for _ in a])
                right += int((chosen == truth).sum())
                total += len(truth)
            table.setdefault(label, {})[size] = right / total
        table[label]["mean"] = sum(table[label][size] for size in sizes) / len(sizes)
    return table


def cost(zoo: Zoo, prompts: list[str], rounds: int, max_new_tokens: int, layer: int | None) -> dict:
    """Seconds of `route` for one prompt against one request (generate), interleaved per round."""
    route_s, request_s = [], []
    for r in range(rounds):
        prompt = prompts[r % len(prompts)]
        t0 = time.perf_counter()
        chosen = route(zoo, [prompt], layer=layer)[0].adapter
        t1 = time.perf_counter()
        zoo.generate([prompt], [chosen], max_new_tokens=max_new_tokens)
        t2 = time.perf_counter()
        route_s.append(t1 - t0)
        request_s.append(t2 - t1)
    r, q = statistics.median(route_s), statistics.median(request_s)
    return {
        "rounds": rounds,
        "max_new_tokens": max_new_tokens,
        "route_ms": round(r * 1000, 2),
        # the mean counts the close calls the router re-encodes in float32 (routing.SentenceEncoder)
        "route_ms_mean": round(statistics.mean(route_s) * 1000, 2),
        "request_ms": round(q * 1000, 1),
        "routing_share": r / (r + q),
    }


def routing_at(rev: str):
    """adapterzoo/routing.py as it was at git revision `rev`, imported beside today's (own caches)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:adapterzoo/routing.py"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    path = Path(tempfile.mkdtemp()) / "routing_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("adapterzoo.routing_then", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "adapterzoo"  # its relative imports resolve to today's package
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cost_against(zoo: Zoo, then, prompts: list[str], rounds: int, max_new_tokens: int) -> dict:
    """Seconds of one prompt's routing, then (`routing_at`) vs now, and of the request, interleaved:
    each round routes with both (alternating which goes first) and runs the request after each."""
    route_then = [d.adapter for d in then.route(zoo, prompts)]
    same = route_then == [d.adapter for d in route(zoo, prompts)]
    times: dict[str, list[float]] = {"then": [], "now": [], "request": []}
    for r in range(rounds):
        prompt = prompts[r % len(prompts)]
        order = [("then", then.route), ("now", route)]
        for label, router in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            chosen = router(zoo, [prompt])[0].adapter
            t1 = time.perf_counter()
            zoo.generate([prompt], [chosen], max_new_tokens=max_new_tokens)
            times[label].append(t1 - t0)
            times["request"].append(time.perf_counter() - t1)
    ms = {label: statistics.median(ts) * 1000 for label, ts in times.items()}
    return {
        "rounds": rounds,
        "same_decisions": same,
        **{f"{label}_ms": round(v, 2) for label, v in ms.items()},
        "share_then": ms["then"] / (ms["then"] + ms["request"]),
        "share_now": ms["now"] / (ms["now"] + ms["request"]),
        "now_over_then": ms["now"] / ms["then"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--library", type=Path, default=SPECIALISTS)
    parser.add_argument("--n", type=int, default=20, help="held-out inputs per task")
    parser.add_argument("--scale", default="", help="comma-separated adapter counts for routing at scale (32,116)")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="base layers the router runs (default: routing.default_layer; 0: embeddings only)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--routers", default=",".join(ROUTERS), help="routers measured on the trained specialists (prototype,arrow)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", default="", help="git revision: also time routing.py as it was there (A/B)")
    parser.add_argument(
        "--held-out",
        choices=tuple(HELD_OUT_SETS),
        default="paraphrases",
        help="test instructions: the held-out paraphrases (default) or the fresh held-out set of 2026-12-02",
    )
    parser.add_argument(
        "--cv", action="store_true", help="only cross-validate the choice among adapters on the routing examples"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert not set(GENERAL_PROMPTS) & set(BACKGROUND_PROMPTS)
    if args.cv:
        specialists = sorted(p.parent.name for p in args.library.glob(f"*/{CONFIG_FILE}"))
        sizes = {str(len(specialists)): specialists, "32": _spread(32), "116": list(all_tasks())}
        table = cross_validate(sizes)
        print("\nleave one routing phrasing out: right adapter (held-out paraphrases never read)\n")
        print(f"| choice by | {' | '.join(sizes)} | mean |")
        print("|---|" + "---:|" * (len(sizes) + 1))
        for label, row in table.items():
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
        print(f"\nwrote {save_json('routing_cv', {'machine': machine(), 'right_adapter': table})}")
        return

    routers = tuple(m for m in args.routers.split(",") if m)
    # 32 slots: a batch of 32 routed rows may name up to 32 different adapters of a large library
    zoo = Zoo.from_pretrained(args.base, device="cpu", slots=32)
    tasks = load_library(zoo, args.library)
    held_out = HELD_OUT_SETS[args.held_out]
    results: dict = {
        "machine": machine(),
        "base": args.base,
        "library": str(args.library),
        "held_out": args.held_out,
    }
    print(f"{len(tasks)} specialists from {args.library}: {', '.join(tasks)}", flush=True)
    results["layer"] = args.layer
    results["encoder"] = "base" if args.layer is not None else DEFAULT_ENCODER
    results["trained"] = t = trained(zoo, tasks, args.n, args.layer, routers, held_out)
    general = {
        m: [
            d.adapter
            for d in route(zoo, GENERAL_PROMPTS, method=m, **({"layer": args.layer} if m == "prototype" else {}))
        ]
        for m in routers
    }
    results["general_fallback"] = {m: sum(c is None for c in g) / len(g) for m, g in general.items()}
    prompts = [
        ex.prompt for task in tasks.values() for ex in instructed_examples(task, 2, "test", seed=9, held_out=held_out)
    ]
    # shuffled once, so the rounds sample every family (in order, 15 rounds among 116 tasks timed only
    # the addmod and caesar prompts, and never a general one)
    timed = random.Random(0).sample(prompts + GENERAL_PROMPTS[:5], len(prompts) + 5)
    results["cost"] = c = cost(zoo, timed, args.rounds, 16, args.layer)
    if args.against:
        a = cost_against(zoo, routing_at(args.against), timed, 2 * args.rounds, 16)
        results["cost_against"] = {"revision": args.against, **a}
        print(
            f"\nrouting cost, {args.against} vs now ({a['rounds']} interleaved rounds, same decisions: "
            f"{a['same_decisions']}): {a['then_ms']} ms -> {a['now_ms']} ms ({a['now_over_then']:.2f}x) of a "
            f"{a['request_ms']} ms request: {100 * a['share_then']:.2f}% -> {100 * a['share_now']:.2f}%",
            flush=True,
        )
    results["scale"] = []
    for size in [int(s) for s in args.scale.split(",") if s]:
        print(f"routing among {size} adapters ...", flush=True)
        results["scale"].append(at_scale(args.base, size, max(2, args.n // 4), args.layer, held_out))

    layer = "default" if args.layer is None else args.layer
    print(
        f"\n{len(tasks)} trained specialists, {args.n} held-out inputs each, instructions from the "
        f"{args.held_out} held-out set, "
        f"encoder {results['encoder']}, router layer {layer}:\n"
    )
    learned = t["tasks_oracle_above_0"]
    print(
        f"| router | right adapter | exact match | vs oracle | mean per-task ratio ({learned} tasks, oracle > 0) "
        "| fell back on task prompts | general prompts to base |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| oracle (named) | 1.00 | {t['oracle_exact_match']:.3f} | 1.00 | 1.00 | - | - |")
    base_share = t["base_exact_match"] / max(t["oracle_exact_match"], 1e-9)
    print(f"| bare base | - | {t['base_exact_match']:.3f} | {base_share:.2f} | - | - | - |")
    for m in routers:
        print(
            f"| {m} | {t[m + '_right_adapter']:.3f} | {t[m + '_exact_match']:.3f} | {t[m + '_vs_oracle']:.3f} | "
            f"{t[m + '_vs_oracle_per_task_mean']:.3f} | {t[m + '_fell_back']:.3f} | "
            f"{results['general_fallback'][m]:.3f} |"
        )
    for m in routers:
        # the misroutings that cost exact match first: a wrong choice on a task its specialist cannot do costs nothing
        confusion = sorted(t[m + "_confusion"], key=lambda w: -w["count"] * t["per_task"][w["task"]]["oracle"])
        print(f"\n{m}: misrouted held-out prompts (task -> chosen, count of n; oracle exact match of the task)")
        for w in confusion[:30]:
            oracle = t["per_task"][w["task"]]["oracle"]
            print(f"  {w['task']} -> {w['chosen'] or 'base'}: {w['count']}/{w['of']} (oracle {oracle:.2f})")
    print(
        f"\nrouting cost (prototype, 1 prompt): median {c['route_ms']} ms vs the request's {c['request_ms']} ms "
        f"(16 new tokens): {100 * c['routing_share']:.1f}% of the request's time ({c['rounds']} interleaved rounds; "
        f"mean {c['route_ms_mean']} ms)"
    )
    if results["scale"]:
        print("\n| adapters | right adapter (prototype) | fell back | wrong family | general prompts to base |")
        print("|---:|---:|---:|---:|---:|")
        for s in results["scale"]:
            print(
                f"| {s['adapters']} | {s['right_adapter']:.3f} | {s['fell_back']:.3f} | {s['wrong_family']:.3f} | "
                f"{s['general_fallback']:.3f} |"
            )
    suffix = ("" if args.layer is None else f"_layer{args.layer}") + ("_fresh" if args.held_out == "fresh" else "")
    # a library of its own (--library DIR) gets its own file, so it never overwrites the shipped specialists' figures
    name = "routing" if args.library == SPECIALISTS else f"routing_{len(tasks)}"
    print(f"\nwrote {save_json(name + suffix, results)}")


if __name__ == "__main__":
    main()
