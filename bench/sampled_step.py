"""One training step's time against the catalogue size, exact and sampled losses.

    python bench/sampled_step.py --items 12101 50000 300000 1000000 [--threads 1]

For each N: a model of N items (d = 64, the paper's settings), a random transition
graph of ``--transitions`` successors per item (TED's teacher), Zipf item counts for
the sampler, and batches of 256 users whose lengths follow S2's (mean ~10 items,
T' up to 50). Times forward + backward + Adam over ``--steps`` steps after one warm-up
step, for ``--loss exact`` (skipped above ``--exact-max`` items: it grows as N) and
``--loss sampled`` (K = 1024). Prints a markdown table; docs/scaling.md keeps the results.

    python bench/sampled_step.py --data s2/sequences.txt --ted-samples 0 32 [--threads 1]

With ``--data``: the sampled step on that file's own batches (the trainer's examples, in
a seeded random order) and its own TED teacher, for each ``--ted-samples`` value (0: every
teacher entry), split into forward, backward and Adam (CPU seconds per step);
``--lazy-item-updates`` / ``--no-lazy-item-updates`` time it with lazy or dense Adam over the
item rows (unset: as the trainer would, lazy unless ``--ted-samples 0``).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.training.host_memory import keep_freed_memory
from mqsa.training.losses import LossSettings, TEDTeacher
from mqsa.training.sampled_loss import NegativeSampler
from mqsa.training.trainer import Objective, TrainConfig, build_optimizer, ready_gradients
from mqsa.training.transitions import TransitionGraph


def batch(rng: np.random.Generator, n: int, users: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T') left-padded inputs and targets, lengths ~ 2 + geometric(mean 8), items Zipf-ish."""
    lengths = np.minimum(2 + rng.geometric(1 / 8, users), max_len + 1)
    width = int(lengths.max()) - 1
    inputs = np.full((users, width), n, dtype=np.int64)
    targets = np.full((users, width), n, dtype=np.int64)
    for u, length in enumerate(lengths):
        seq = np.minimum(rng.zipf(1.2, length) - 1, n - 1)
        inputs[u, width - length + 1 :] = seq[:-1]
        targets[u, width - length + 1 :] = seq[1:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def teacher(rng: np.random.Generator, n: int, per_item: int) -> TEDTeacher:
    """A graph with ``per_item`` random successors per item, as a TED teacher (tau 0.1)."""
    src = np.repeat(np.arange(n), per_item)
    dst = rng.integers(0, n, n * per_item)
    keys = np.unique(src * n + dst)
    rows, cols = np.divmod(keys, n)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    graph = TransitionGraph(num_items=n, indptr=indptr, indices=cols, counts=np.ones(len(cols), np.float32))
    return TEDTeacher.from_graph(graph, 0.1)


def time_steps(n: int, loss: str, args: argparse.Namespace) -> float:
    """Mean CPU seconds of this process per step (forward, backward, Adam) over ``args.steps``
    steps: steadier than wall time on a shared machine; with one thread, about the wall time."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = MQSA(MQSAConfig(num_items=n))
    sampled = loss == "sampled"  # as the trainer sets it up: L2's gradient in Adam, sparse lookups
    samples = TrainConfig().ted_samples if sampled else 0
    settings = LossSettings(0.1, 0.1, 1e-4, 256, torch.float32, l2_in_optimizer=sampled, ted_samples=samples)
    # l2 1e-4, in Adam when sampled; the dense update, as the loss settings above (TED's exact sum)
    optimizer = build_optimizer(model, TrainConfig(loss=loss, lazy_item_updates=False))
    ted = teacher(rng, n, args.transitions)
    counts = np.minimum(rng.zipf(1.2, n), 10**6)
    sampler = NegativeSampler.from_counts(counts, 1024)
    if sampled:
        model.use_sparse_item_gradients()
    batches = [batch(rng, n, 256, 50) for _ in range(args.steps + 1)]
    objective = Objective(model, ted, settings, sampler if sampled else None)  # the trainer's one call
    seconds = []
    for inputs, targets in batches:
        start = time.process_time()
        value, _ = objective(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        ready_gradients(model, optimizer)
        optimizer.step()
        seconds.append(time.process_time() - start)
    return float(np.mean(seconds[1:]))


def time_data_steps(path: str, samples: int, steps: int, lazy: bool | None = None) -> dict[str, float]:
    """CPU seconds per sampled step on ``path``'s batches, by part (as the trainer runs it);
    ``lazy``: ``--lazy-item-updates`` (None: the trainer's default, lazy where TED can be estimated)."""
    from mqsa.models.mqsa import MQSAConfig
    from mqsa.training.sequences import read_sequences
    from mqsa.training.trainer import TrainingData

    config = TrainConfig(loss="sampled", ted_samples=samples, lazy_item_updates=lazy)
    sequences = read_sequences(path)
    model_config = MQSAConfig(num_items=sequences.num_items)
    data = TrainingData.build(path, sequences, None, model_config, config.time_span)
    ted = TEDTeacher.from_graph(data.graph, config.tau)
    settings = config.loss_settings(model_config.num_items)
    sampler = NegativeSampler.from_counts(data.item_counts, config.negatives)
    torch.manual_seed(0)
    model = MQSA(model_config)
    model.use_sparse_item_gradients()
    optimizer = build_optimizer(model, config)  # the trainer's
    order = np.random.default_rng(0).permutation(len(data.examples))
    objective = Objective(model, ted, settings, sampler)  # the trainer's one call
    parts = np.zeros(3)
    for step in range(steps + 1):
        if step == 1:  # the first step warms up
            start = resource.getrusage(resource.RUSAGE_SELF)
        rows = order[np.arange(step * 256, (step + 1) * 256) % len(order)]  # round again on small files
        inputs, targets = data.examples.batch(rows, torch.device("cpu"))
        marks = [time.process_time()]
        loss, _ = objective(inputs, targets)
        marks.append(time.process_time())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ready_gradients(model, optimizer)
        marks.append(time.process_time())
        optimizer.step()
        marks.append(time.process_time())
        if step:
            parts += np.diff(marks)
    end = resource.getrusage(resource.RUSAGE_SELF)
    kernel = {"of it system": end.ru_stime - start.ru_stime, "page faults": end.ru_minflt - start.ru_minflt}
    return dict(zip(("forward", "backward", "adam"), parts / steps, strict=True)) | {
        k: v / steps for k, v in kernel.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[12101, 50000, 300000, 1000000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transitions", type=int, default=30)
    parser.add_argument("--exact-max", type=int, default=300000)
    parser.add_argument("--data", help="time the sampled step on this sequence file instead")
    parser.add_argument("--ted-samples", type=int, nargs="+", default=[0, TrainConfig().ted_samples])
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as the trainer does (training/host_memory.py); --no-keep-freed-memory: glibc's default",
    )
    parser.add_argument(
        "--lazy-item-updates",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --data: lazy Adam over the item rows (TrainConfig.lazy_item_updates; unset: the trainer's default)",
    )
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.data:
        print(
            "| ted_samples | forward | backward | Adam | CPU s/step | of it system | page faults/step |\n"
            "|---|---|---|---|---|---|---|"
        )
        for samples in args.ted_samples:
            parts = time_data_steps(args.data, samples, args.steps, args.lazy_item_updates)
            step = sum(parts[k] for k in ("forward", "backward", "adam"))
            shown = " | ".join(f"{parts[k]:.3f}" for k in ("forward", "backward", "adam"))
            kernel = f"{parts['of it system']:.3f} | {parts['page faults']:,.0f}"
            print(f"| {samples} | {shown} | {step:.3f} | {kernel} |", flush=True)
        return
    print("| items N | exact, CPU s/step | sampled, CPU s/step |\n|---|---|---|")
    for n in args.items:
        exact = f"{time_steps(n, 'exact', args):.3f}" if n <= args.exact_max else "not run"
        print(f"| {n:,} | {exact} | {time_steps(n, 'sampled', args):.3f} |", flush=True)


if __name__ == "__main__":
    main()
