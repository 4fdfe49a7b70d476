"""Command lines for training and evaluating at a preset's scale, and for the side-by-side benchmark.

    python -m mlcore.train --list                                   # the presets and their sources
    python -m mlcore.train protonet-omniglot-1shot --out runs/pn1 --threads 1
    python -m mlcore.train maml-omniglot-5w1s --steps 3000 --seed 1 --out runs/maml-s1
    python -m mlcore.train maml-omniglot-5w1s --device cuda --compile     # the compiled meta-gradient
    python -m mlcore.evaluate runs/pn1                              # the preset's test protocol
    python -m mlcore.evaluate runs/pn1 --n-way 20                   # the same model tested 20-way
    python -m mlcore.evaluate --summary results                     # every record, seeds pooled
    python -m mlcore.bench maml --threads 1                         # meta-gradient steps side by side
    python -m mlcore.bench complexity --threads 1                   # every method's cost vs S and |θ|

``mlcore train …``, ``mlcore evaluate …`` and ``mlcore bench …`` are the same commands. Running ``train``
again with the same ``--out`` resumes from the last checkpoint (exactly: same weights, episodes and
history as an uninterrupted run); ``--steps`` larger than before continues a finished run.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .compiled import MODES
from .presets import PRESETS, Config, get_preset, preset_table

if TYPE_CHECKING:
    from .bench import BenchConfig
    from .bench_complexity import ComplexityConfig

__all__ = ["train_main", "evaluate_main", "bench_main"]


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise SystemExit(f"--device {text!r} is not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: this torch has no CUDA device available; use --device cpu")
    return device


def _threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 is fastest when other jobs share the CPU)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be a positive integer, got {n}")
        torch.set_num_threads(n)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlcore.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one method from a named preset (the papers' protocols); every option below "
                    "overrides the preset's value.", epilog=__doc__)
    parser.add_argument("preset", nargs="?", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--list", action="store_true", help="print the presets, their values and sources")
    parser.add_argument("--out", default=None, help="run folder (default runs/<preset>-seed<seed>)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop cleanly at the first checkpoint after MINUTES of this session "
                             "(rerun the command later to continue)")
    parser.add_argument("--compile", action="store_true",
                        help="MAML family: take each meta-gradient with mlcore.compiled (torch.compile of the "
                             "vmapped meta-gradient: the same gradient, compiled on the first step, which takes "
                             "minutes on a CPU and pays off on long runs)")
    parser.add_argument("--compile-mode", default=None, choices=MODES,
                        help="torch.compile mode for --compile (default: default; reduce-overhead adds CUDA "
                             "graphs, not yet measured)")
    _threads(parser)
    group = parser.add_argument_group("preset values (override)")
    for f in fields(Config):
        if f.name in ("method", "preset", "source"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper())
    return parser


def train_main(argv: list[str] | None = None) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(preset_table())
        print()
        for name, preset in PRESETS.items():
            print(f"{name}: {preset.source}")
        return 0
    if not args.preset:
        parser.error("name a preset (python -m mlcore.train --list shows them)")
    try:
        config = get_preset(args.preset)
        overrides = {f.name: getattr(args, f.name) for f in fields(Config)
                     if f.name not in ("method", "preset", "source") and getattr(args, f.name) is not None}
        config = config.replace(**overrides)
    except ValueError as err:
        parser.error(str(err))
    _set_threads(args.threads)
    device = _device(args.device)
    out = Path(args.out or f"runs/{config.preset}-seed{config.seed}")
    from .experiment import COMPILED_METHODS, RunFolderError, train
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode sets the mode of --compile; pass --compile too")
    mode = (args.compile_mode or "default") if args.compile else None
    if mode and config.method not in COMPILED_METHODS:
        parser.error(f"--compile applies to the MAML family ({', '.join(COMPILED_METHODS)}); {config.method} has no "
                     f"meta-gradient to compile")
    compiled = f", compiled meta-gradient (mode {mode!r})" if mode else ""
    print(f"{config.preset}: {config.method} on {config.dataset}, {config.steps} steps -> {out} "
          f"({device}, {torch.get_num_threads()} threads, torch {torch.__version__}{compiled})", flush=True)
    def terminated(signum, frame):  # kill / a scheduler's SIGTERM: stop like Ctrl-C (session logged)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        history = train(config, out, device=device, progress=not args.no_progress,
                        command=["python", "-m", "mlcore.train", *(sys.argv[1:] if argv is None else argv)],
                        time_limit=None if args.time_limit is None else 60 * args.time_limit,
                        compile=mode or False)
    except RunFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume from {out / 'checkpoint.pt'}",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if history.steps and history.steps[-1] + 1 < config.steps:
        print(f"stopped at the time limit after step {history.steps[-1] + 1} of {config.steps}; run the "
              f"same command again to continue")
    metric = "val_acc" if "val_acc" in history else "val_mse"
    steps, values = history.series(metric) if metric in history else ([], [])
    if values:
        print(f"done: {len(history)} steps, {history.wall_time[-1]:.0f} s of training; last {metric} "
              f"{values[-1]:.4f} at step {steps[-1] + 1}, best {max(values) if metric == 'val_acc' else min(values):.4f}")
    print(f"evaluate with: python -m mlcore.evaluate {out}")
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlcore.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a trained run (its best-on-validation weights) with its preset's test "
                    "protocol, or an override, and write the run's results record.", epilog=__doc__)
    parser.add_argument("run", nargs="?", help="a run folder (written by mlcore.train) or its best.pt")
    parser.add_argument("--summary", metavar="FOLDER", default=None,
                        help="print every record under FOLDER, seeds of one preset pooled")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    for name, kind, help_ in (("n-way", int, "ways of the test episodes"), ("k-shot", int, "shots"),
                              ("n-query", int, "queries per class"), ("episodes", int, "test episodes"),
                              ("inner-steps", int, "inner steps at test (gradient-based methods)"),
                              ("seed", int, "seed of the test episodes (default 0: the same for every run)")):
        parser.add_argument("--" + name, type=kind, default=None, help=help_)
    parser.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=None,
                        help="batch statistics over the whole query set (default: the preset's)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write record.json")
    parser.add_argument("--progress", action="store_true", help="show a tqdm bar")
    _threads(parser)
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    if args.summary is not None:
        return _print_summary(Path(args.summary))
    if not args.run:
        parser.error("give a run folder (or its best.pt), or --summary FOLDER")
    _set_threads(args.threads)
    device = _device(args.device)
    from .experiment import RunFolderError, device_name, evaluate_run
    path = Path(args.run)
    overrides = dict(n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, episodes=args.episodes,
                     inner_steps=args.inner_steps, transductive=args.transductive, seed=args.seed)
    try:
        method, meta, protocol, result = evaluate_run(
            path, device=device, split=args.split, record=not args.no_record, progress=args.progress,
            command=["python", "-m", "mlcore.evaluate", *(sys.argv[1:] if argv is None else argv)], **overrides)
    except (RunFolderError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: {method.config.preset or method.config.method}, best-on-validation step {meta['step']} "
          f"({meta['val_metric']} {meta['val_value']:.4f}); {protocol.describe()}")
    scale, unit = (100, "%") if result["metric"] == "accuracy" else (1, "")
    print(f"test {result['metric']}: {scale * result['mean']:.2f}{unit} ± {scale * result['ci95']:.2f}{unit} "
          f"(95% CI over {result['n_episodes']} episodes), {1000 * result['seconds_per_episode']:.1f} ms per "
          f"episode on {device_name(device)}")
    if not args.no_record:
        run = path if path.is_dir() else path.parent
        print(f"record: {run / 'record.json'}")
    return 0


def _print_summary(root: Path) -> int:
    from .results import load_records, summarise
    try:
        records = load_records(root)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = summarise(records)
    if not rows:
        print(f"no evaluated runs under {root}")
        return 0
    for s in rows:
        p = s.protocol
        scale = 100 if s.metric == "accuracy" else 1
        seeds = f"± {scale * s.ci95_seeds:.2f} over {len(s.seeds)} seeds, " if not math.isnan(s.ci95_seeds) else ""
        way = f"{p['n_way']}w{p['k_shot']}s" if p["n_way"] else f"{p['k_shot']}-shot"
        print(f"{s.preset:32s} {way:6s} q{p['n_query']:<3d} x{p['episodes']:<5d} "
              f"{'trans.' if p['transductive'] else 'non-tr.'}  {scale * s.mean:7.2f} {seeds}"
              f"± {scale * s.ci95_episodes:.2f} over episodes; steps {list(s.steps)}")
    return 0


def _integer(low: int) -> Callable[[str], int]:
    what = "a positive integer" if low == 1 else "a non-negative integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def bench_parser() -> argparse.ArgumentParser:
    from . import bench  # imported here: train and evaluate should not pay for it
    from .models import NORMS
    parser = argparse.ArgumentParser(prog="python -m mlcore.bench", description=bench.__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    positive, non_negative = _integer(1), _integer(0)
    for name, help_ in (("maml", "Conv4 on Omniglot-size images (random data)"),
                        ("sine", "the sine-regression MLP of Finn et al. 2017")):
        maml, defaults = name == "maml", bench.DEFAULTS[name]
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--threads", type=positive, default=None,
                       help="torch.set_num_threads for this run (default: torch's choice)")
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        p.add_argument("--meta-batch", type=positive, default=defaults["meta_batch"])
        p.add_argument("--k-shot", type=positive, default=defaults["k_shot"],
                       help="support examples per class" if maml else "support points per task")
        p.add_argument("--n-query", type=positive, default=defaults["n_query"],
                       help="query examples per class" if maml else "query points per task")
        p.add_argument("--inner-steps", type=positive, default=1)
        p.add_argument("--inner-lr", type=float, default=defaults["inner_lr"])
        p.add_argument("--hidden", type=positive, default=defaults["hidden"],
                       help="channels of every conv layer" if maml else "width of every hidden layer")
        if maml:
            p.add_argument("--n-way", type=positive, default=5)
            p.add_argument("--image-size", type=positive, default=28)
            p.add_argument("--norm", choices=NORMS, default="batch")
        else:
            p.add_argument("--layers", type=positive, default=2, help="hidden layers")
        p.add_argument("--repeats", type=positive, default=None,
                       help="timed steps per row (default: maml on a CPU 3, otherwise 20)")
        p.add_argument("--warmup", type=non_negative, default=None,
                       help="untimed warm-up rounds (default: maml on a CPU 0, otherwise 3)")
        p.add_argument("--strategies", default=",".join(bench.DEFAULT_STRATEGIES),
                       help=f"comma-separated mlcore strategies among {','.join(bench.STRATEGIES)} ('compiled': "
                            f"meta_backward(compile=...), whose first call compiles, minutes on a CPU)")
        p.add_argument("--compile-modes", default="default",
                       help=f"torch.compile modes of the 'compiled' rows, comma-separated among {','.join(MODES)}")
        p.add_argument("--chunk-size", type=positive, default=None,
                       help="add an 'mlcore vmap chunk=N, meta_backward' row")
        p.add_argument("--no-first-order", action="store_true", help="time second-order MAML only")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    _complexity_parser(sub, positive, non_negative)
    return parser


def _integers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def _complexity_parser(sub: argparse._SubParsersAction, positive: Callable[[str], int],
                       non_negative: Callable[[str], int]) -> None:
    from . import bench_complexity
    defaults = bench_complexity.ComplexityConfig()
    p = sub.add_parser("complexity", help="FLOPs, peak memory and time of every method against S and |θ|",
                       description=bench_complexity.__doc__.split("\n\n")[1],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads for this run")
    for name in ("hidden", "meta_batch", "n_way", "k_shot", "n_query", "inner_steps", "repeats"):
        p.add_argument("--" + name.replace("_", "-"), type=positive, default=getattr(defaults, name))
    p.add_argument("--warmup", type=non_negative, default=defaults.warmup)
    p.add_argument("--steps", type=_integers, default=defaults.steps, help="the inner steps S of the S axis")
    p.add_argument("--widths", type=_integers, default=defaults.widths, help="Conv4 widths of the |θ| axis")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")


def bench_config(argv: list[str] | None = None) -> BenchConfig | ComplexityConfig:
    """Parse ``argv`` (default: sys.argv[1:]) into a :class:`mlcore.bench.BenchConfig` (or, for
    ``complexity``, a :class:`mlcore.bench_complexity.ComplexityConfig`); a value it refuses is a usage
    error (exit status 2), like a malformed option."""
    from .bench import BenchConfig
    from .bench_complexity import ComplexityConfig
    parser = bench_parser()
    options = vars(parser.parse_args(argv))
    benchmark = options.pop("benchmark")
    if benchmark == "complexity":
        options["json"] = options["json"] and str(Path(options["json"]).expanduser())
        try:
            return ComplexityConfig(**options)
        except ValueError as err:
            parser.error(str(err))
    options["benchmark"] = benchmark
    options["strategies"] = tuple(s.strip() for s in options["strategies"].split(",") if s.strip())
    options["compile_modes"] = tuple(s.strip() for s in options["compile_modes"].split(",") if s.strip())
    options["json"] = options["json"] and str(Path(options["json"]).expanduser())
    try:
        return BenchConfig(**options)
    except ValueError as err:
        parser.error(str(err))


def bench_main(argv: list[str] | None = None) -> int:
    from .bench import main
    main(argv)
    return 0
