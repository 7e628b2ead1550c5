"""Bundle size, export time and encoder/search latency for a checkpoint.

    python bench/export_bench.py --checkpoint runs/beauty/best.pt [--out /tmp/bundle]

Latency: onnxruntime on CPU with 1 thread (intra and inter op), FAISS with 1
thread; the median and p99 of many timed calls after a warm-up, with
sequences drawn from the model's item range at the length given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median, p99) milliseconds of ``fn()`` over ``repeat`` calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default=None, help="bundle directory (default: a temporary one)")
    parser.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--repeat", type=int, default=1000)
    args = parser.parse_args()

    from mqsa.service.bundle import load_bundle
    from mqsa.service.retrieval import blend
    from mqsa.training.export import ExportConfig, export_bundle

    out = Path(args.out or tempfile.mkdtemp()) / "bundle"
    manifest = export_bundle(args.checkpoint, out, ExportConfig(index=args.index), force=True)
    size = sum(f["bytes"] for f in manifest["files"].values()) + (out / "manifest.json").stat().st_size
    bundle = load_bundle(out, onnx_threads=1, faiss_threads=1)
    rng = np.random.default_rng(0)
    n, T = bundle.num_items, bundle.max_len
    rows = [f"| items | {n} |", f"| bundle size | {size / 1e6:.2f} MB |"]
    rows.append(f"| export time | {manifest['export_seconds']:.1f} s |")
    for name, bytes_ in ((k, v["bytes"]) for k, v in manifest["files"].items()):
        rows.append(f"| {name} | {bytes_ / 1e6:.2f} MB |")
    for batch, length in ((1, 9), (1, T), (64, 9), (64, T)):
        x = rng.integers(0, n, size=(batch, length), dtype=np.int64)
        p50, p99 = timed(lambda x=x: bundle.encode(x), args.repeat if batch == 1 else args.repeat // 5)
        rows.append(f"| encoder, batch {batch}, length {length} | p50 {p50:.3f} ms, p99 {p99:.3f} ms |")
    short, long = bundle.encode(rng.integers(0, n, size=(64, 9), dtype=np.int64))
    z = blend(short, long, bundle.alpha)
    p50, p99 = timed(lambda: bundle.search(z[:1], 100), args.repeat)
    rows.append(f"| {args.index} search, 1 query, top 100 | p50 {p50:.3f} ms, p99 {p99:.3f} ms |")
    print("| what | measured |\n|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
