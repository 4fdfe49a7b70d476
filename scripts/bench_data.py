"""Benchmark the data path: Omniglot decode / cached load, and EpisodeSampler throughput.

    python scripts/bench_data.py [--root PATH] [--device cpu|cuda] [--no-cold]

Cold loads decode into a fresh temporary cache (so the numbers do not depend on what is cached
already); cached loads and sampling report the median of several runs after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from mlcore.data.omniglot import load_omniglot, omniglot_root
from mlcore.episodes import EpisodeSampler


def timed(fn, repeats: int, sync=lambda: None) -> tuple[float, float, object]:
    """(median, min) wall time of ``fn()`` over ``repeats`` runs after one warm-up run, and its last result."""
    result = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="Omniglot folder (default: $MLCORE_OMNIGLOT, else the cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (decoding) loads")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = omniglot_root(args.root)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), f"| Omniglot at {root}")
    print("load average (1, 5, 15 min): %.1f %.1f %.1f on %d cores: other work on the machine slows all of "
          "this, multithreaded ops most" % (*os.getloadavg(), os.cpu_count()))

    print("\nload_omniglot, 28x28                 first load (decode)   cached load (median / min of 5)")
    for split in ("train", "test"):
        cold = float("nan")
        if not args.no_cold:
            with tempfile.TemporaryDirectory() as cache:
                saved = os.environ.get("MLCORE_CACHE")
                os.environ["MLCORE_CACHE"] = cache          # a fresh cache: the first load must decode
                try:
                    start = time.perf_counter()
                    load_omniglot(root, split=split, progress=False)
                    cold = time.perf_counter() - start
                finally:
                    if saved is None:
                        del os.environ["MLCORE_CACHE"]
                    else:
                        os.environ["MLCORE_CACHE"] = saved
        warm, best, (images, _) = timed(lambda: load_omniglot(root, split=split, progress=False), 5)
        print(f"  vinyals {split:<6} {tuple(images.shape)!s:<22} {cold:8.2f} s            {warm:.3f} / {best:.3f} s")

    images, labels = load_omniglot(root, split="train", progress=False)
    print(f"\nEpisodeSampler on vinyals train ({labels.max().item() + 1} classes), meta_batch {args.meta_batch}, "
          f"device {device}")
    for n_way, k_shot, n_query in ((5, 1, 15), (20, 5, 15)):
        sampler = EpisodeSampler(images, labels, n_way=n_way, k_shot=k_shot, n_query=n_query,
                                 generator=torch.Generator().manual_seed(0), device=device)
        per_batch, best, tasks = timed(lambda: sampler.sample(args.meta_batch), 50, sync)
        index_only, _, _ = timed(lambda: sampler.sample_indices(args.meta_batch), 50)
        mb = (tasks.x_support.numel() + tasks.x_query.numel()) * tasks.x_support.element_size() / 2**20
        print(f"  {n_way:>2}-way {k_shot}-shot {n_query} query: median {per_batch * 1e3:6.2f} ms per batch "
              f"({mb:.0f} MB of images) = {args.meta_batch / per_batch:6.0f} episodes/s "
              f"(best run {args.meta_batch / best:6.0f}/s); indices alone {index_only * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
