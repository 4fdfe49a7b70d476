"""Command line of mlcore: ``python -m mlcore <command> …`` (also installed as the ``mlcore`` script).

Commands:
    train PRESET [options]      train from a named preset (= ``python -m mlcore.train``; ``--list``)
    evaluate RUN [options]      evaluate a trained run, write its results record (= ``python -m mlcore.evaluate``)
    bench maml|sine [options]   side-by-side timing and gradient checks of a meta-gradient step
                                (the same as ``python -m mlcore.bench``; ``--help`` lists the options)
    version                     print mlcore's and torch's versions
"""
from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlcore", description=__doc__.split("\n")[0],
                                     epilog="Run 'mlcore bench --help' for the benchmark's options.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train from a preset (python -m mlcore.train)", add_help=False)
    sub.add_parser("evaluate", help="evaluate a run (python -m mlcore.evaluate)", add_help=False)
    sub.add_parser("bench", help="benchmark a meta-gradient step (python -m mlcore.bench)", add_help=False)
    sub.add_parser("version", help="print versions")
    args, rest = parser.parse_known_args(argv)
    if args.command == "version":
        if rest:
            parser.error(f"'version' takes no arguments, got {rest}")
        import torch
        print(f"mlcore {__version__}, torch {torch.__version__}")
        return 0
    from . import cli  # imported here: 'mlcore version' should not pay for it
    return {"train": cli.train_main, "evaluate": cli.evaluate_main, "bench": cli.bench_main}[args.command](rest)


if __name__ == "__main__":
    sys.exit(main())
