"""Step-level A/B inside one torchrun job: the old hand-written all-reduce vs DDP, in
alternating blocks of the same batches, so the machine's drift hits both alike.

    mqsa data synth --out /tmp/ddp-data --users 20000 --items 2000
    torchrun --standalone --nproc_per_node 2 bench/ddp_step_ab.py /tmp/ddp-data/sequences.txt 60

The second argument is the number of 5-step blocks. Results: docs/speed.md ("Two processes").
"""

import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import mqsa
from mqsa.training.trainer import TrainConfig, Trainer


def average_gradients(world, model):  # World.average_gradients at HEAD, verbatim
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


data, reps, block = sys.argv[1], int(sys.argv[2]), 5
t = Trainer(data, "/tmp/ddp-step-ab", {}, TrainConfig(epochs=1, threads=1), progress=False)
ddp, world = t.objective, t.world
plain = ddp.module
if world.is_main:
    print(mqsa.__file__, type(ddp).__name__, torch.get_num_threads(), flush=True)
order = t.rng.permutation(len(t.data.examples))
batches = [order[i : i + 256] for i in range(0, len(order) - 255, 256)]
times = {"old": [], "ddp": []}
k = 0
for rep in range(reps):
    chosen = [batches[(k + j) % len(batches)] for j in range(block)]
    k += block
    for name in ("old", "ddp") if rep % 2 == 0 else ("ddp", "old"):
        for rows in chosen:
            inputs, targets = t.data.examples.batch(world.shard(rows), t.device)
            start = time.perf_counter()
            loss, _ = (ddp if name == "ddp" else plain)(inputs, targets)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if name == "old":
                average_gradients(world, t.model)
            t.optimizer.step()
            times[name].append(time.perf_counter() - start)
sums = world.checksums(t.model)
if world.is_main:
    for name, v in times.items():
        v = np.array(v[block:]) * 1000  # the first block warms up
        print(f"{name}: {len(v)} steps, mean {v.mean():.1f} ms, median {np.median(v):.1f} ms", flush=True)
    print("old/ddp mean ratio %.3f" % (np.mean(times["old"][block:]) / np.mean(times["ddp"][block:])))
    print("replicas identical:", sums[0] == sums[1])
world.close()
