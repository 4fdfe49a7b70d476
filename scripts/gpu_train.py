"""Train as many MAML-family presets as fit in one GPU lease; write run folders, records and a table.

One call, one output folder: each preset trains (resuming if its run folder is already there) for its
share of the time budget, stops cleanly at a checkpoint when the share is spent, is evaluated with the
preset's test protocol and with a short 100-episode protocol (the one the Results chapter re-checks
live), and gets its results record. Everything lands under OUT/runs/<preset>-seed<seed>/; copy those
folders into results/runs/ and commit them. Needs only torch and mlcore (the GPU image has no book
packages); Omniglot comes from $MLCORE_OMNIGLOT (or is downloaded).

    python scripts/gpu_train.py "$OUT" --budget 480                # a GPU lease: 8 minutes of work
    python scripts/gpu_train.py /tmp/gpu --budget 60 --tiny        # the same script at toy size (CPU)

The default order is the issue's: MAML 5-way 1-shot first (the 40,000 iterations of Finn et al.'s code), then
FOMAML, 20-way 1-shot MAML, ANIL, Meta-SGD, Reptile; ``--presets`` and ``--shares`` change it.

``--compile`` trains the MAML-family presets (not Reptile) with the compiled meta-gradient
(:mod:`mlcore.compiled`): the same gradient. An equivalent hand-written function measured ~3x faster per
step than vmap on an H200 (10.8 against 31 ms, MAML 5-way 1-shot, 15 queries per class, issue 20) after a
first compile of 93 s; mlcore's compiled path has not been timed on a GPU yet. The compile (once per
preset) counts against the preset's share, so it pays off for shares of several minutes (full-length
runs), not for short ones: a 70 s share would spend most of itself compiling.

    python scripts/gpu_train.py "$OUT" --budget 3000 --presets maml-omniglot-5w1s --compile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing mlcore

from mlcore import experiment  # noqa: E402
from mlcore.presets import get_preset  # noqa: E402

DEFAULT = ("maml-omniglot-5w1s:0.45,fomaml-omniglot-5w1s:0.15,maml-omniglot-20w1s:0.15,"
           "anil-omniglot-5w1s:0.1,metasgd-omniglot-5w1s:0.1,reptile-omniglot-5w1s:0.05")
TINY = dict(steps=6, val_every=3, val_episodes=2, checkpoint_every=2, hidden=8, meta_batch=2)


def parse_plan(text: str) -> list[tuple[str, float]]:
    plan = []
    for item in text.split(","):
        name, _, share = item.partition(":")
        get_preset(name)  # raises with the list of presets
        plan.append((name, float(share) if share else 1.0))
    total = sum(s for _, s in plan)
    return [(n, s / total) for n, s in plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output folder (e.g. $OUT on the GPU machine)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for training and evaluation")
    parser.add_argument("--presets", default=DEFAULT, help="preset:share,… (shares of the budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-reserve", type=float, default=0.15,
                        help="fraction of each share kept for evaluation")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to test the script on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="MAML family: the compiled meta-gradient (mlcore.compiled; first step compiles)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    plan = parse_plan(args.presets)
    print(f"device {experiment.device_name(device)}, torch {torch.__version__}, budget {args.budget:.0f} s, "
          f"plan {plan}{', compiled meta-gradients' if args.compile else ''}", flush=True)
    began = time.perf_counter()
    rows = []
    for i, (name, share) in enumerate(plan):
        remaining = args.budget - (time.perf_counter() - began)
        later = sum(s for _, s in plan[i:])
        seconds = remaining * share / later
        if seconds < 5:
            print(f"{name}: no time left, skipped", flush=True)
            continue
        config = get_preset(name).replace(seed=args.seed, **(TINY if args.tiny else {}))
        if args.tiny and config.method == "reptile":
            config = config.replace(k_shot=3, test_inner_steps=2)
        run = args.out / "runs" / f"{name}-seed{args.seed}"
        compile = args.compile and config.method in experiment.COMPILED_METHODS
        t0 = time.perf_counter()
        history = experiment.train(config, run, device=device, progress=False,
                                   time_limit=seconds * (1 - args.eval_reserve), compile=compile,
                                   command=["python", "scripts/gpu_train.py", *(argv or sys.argv[1:])])
        trained = time.perf_counter() - t0
        episodes = 4 if args.tiny else None
        evaluations = []
        for overrides in (dict(episodes=episodes), dict(episodes=4 if args.tiny else 100)):
            _, meta, protocol, result = experiment.evaluate_run(
                run, device=device, command=["python", "scripts/gpu_train.py", "(evaluation)"], **overrides)
            evaluations.append((protocol, result))
        steps = history.steps[-1] + 1 if history.steps else 0
        protocol, result = evaluations[0]
        rows.append(dict(preset=name, steps=steps, of=config.steps, train_s=round(trained, 1), compiled=compile,
                         step_ms=round(1000 * history.wall_time[-1] / max(steps, 1), 1) if steps else None,
                         best_step=meta["step"], val=meta["val_value"], test=result["mean"],
                         ci95=result["ci95"], protocol=protocol.describe()))
        print(f"{name}: {steps}/{config.steps} steps in {trained:.0f} s, test "
              f"{100 * result['mean']:.2f}% ± {100 * result['ci95']:.2f}% ({protocol.describe()})", flush=True)
    print()
    print(f"{'preset':26s} {'steps':>13s} {'ms/step':>8s} {'best val':>8s} {'test':>16s}")
    for r in rows:
        print(f"{r['preset']:26s} {r['steps']:>6d}/{r['of']:<6d} {r['step_ms'] or 0:8.1f} {100 * r['val']:8.2f} "
              f"{100 * r['test']:8.2f} ± {100 * r['ci95']:.2f}")
    (args.out / "gpu_train_summary.json").write_text(json.dumps(
        {"device": experiment.device_name(device), "torch": torch.__version__, "budget_s": args.budget,
         "elapsed_s": round(time.perf_counter() - began, 1), "rows": rows}, indent=1))
    print(f"total {time.perf_counter() - began:.0f} s; copy {args.out / 'runs'}/* into results/runs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
