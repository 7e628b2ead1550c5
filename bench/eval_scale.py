"""Time and peak memory of one validation pass and of the baselines on a generated catalogue.

    python bench/eval_scale.py [--users 3000] [--items 200000] [--item-chunk 2048] [--sample 0]

Generates synthetic data (``SynthConfig``), builds an untrained model (d = 64, T = 50) and
times one full-ranking validation pass (``--item-chunk`` equal to ``--items`` ranks the whole
catalogue in one step, as before chunking), a pass over ``--sample`` users when given, and the
two baselines on the validation and test splits. Peak RSS is that of the whole process: run
one setting per process to compare (docs/scaling.md, "Evaluation at scale").
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.evaluation import (
    baseline_metrics,
    evaluate_model,
    make_test_set,
    make_validation_set,
    sample_eval_set,
)
from mqsa.training.sequences import read_sequences, split_leave_one_out
from mqsa.training.synth import SynthConfig, write_synthetic
from mqsa.training.transitions import TransitionGraph


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--item-chunk", type=int, default=2048)
    parser.add_argument("--sample", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    synth = SynthConfig(
        users=args.users,
        items=args.items,
        tastes=max(8, args.items // 100),
        bundles=max(100, args.items // 6),
        mean_length=10,
    )
    path = write_synthetic(Path(tempfile.mkdtemp()), synth)
    split = split_leave_one_out(read_sequences(path).sequences, 50)
    valid, test = make_validation_set(split, 50), make_test_set(split, 50)
    model = MQSA(MQSAConfig(num_items=args.items, max_len=50, hidden_size=64)).eval()
    print(f"{args.users} users x {args.items} items; setup peak RSS {peak_mib():.0f} MiB", flush=True)
    start = time.perf_counter()
    evaluate_model(model, valid, item_chunk=args.item_chunk)
    print(
        f"validation pass, chunk {args.item_chunk}: {time.perf_counter() - start:.2f} s, peak RSS {peak_mib():.0f} MiB",
        flush=True,
    )
    if args.sample:
        start = time.perf_counter()
        evaluate_model(model, sample_eval_set(valid, args.sample, 1), item_chunk=args.item_chunk)
        print(f"validation pass over {args.sample} users: {time.perf_counter() - start:.2f} s", flush=True)
    graph = TransitionGraph.from_sequences(split.train, args.items, 1)
    start = time.perf_counter()
    baseline_metrics(split, graph, {"valid": valid, "test": test})
    print(f"baselines (valid and test): {time.perf_counter() - start:.2f} s, peak RSS {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
