"""`mqsa data prepare` on a large generated log: wall time and peak memory.

    python bench/prepare_scale.py --events 1e8 [--memory-gb 4] [--workdir /tmp/prepare-scale]

Writes a Parquet log of ``--events`` rows (users uniform over events/10 ids, items
Zipf(1.3) folded onto events/30 ids: many users with a few events, a long tail of
items; 1.3 GB at 10^8), then runs ``mqsa data prepare`` under ``/usr/bin/time -v``
and prints its summary, wall time and peak RSS. The log is kept for reruns. Not a
test (10^8 events: about 3 minutes to write and 4-6 minutes to prepare on 2 cores).
Results: docs/scaling.md, "Preparing large logs".
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK = 2_000_000
SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])


def write_log(path: Path, events: int) -> None:
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for start in range(0, events, CHUNK):
            n = min(CHUNK, events - start)
            users = rng.integers(0, events // 10, n)
            items = np.minimum(rng.zipf(1.3, n), 10**7) % (events // 30)
            writer.write_table(
                pa.table(
                    {
                        "user_id": pa.array(np.char.add("u", users.astype(str))),
                        "item_id": pa.array(np.char.add("i", items.astype(str))),
                        "timestamp": np.arange(start, start + n),
                    },
                    schema=SCHEMA,
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=float, default=1e8)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prepare-scale"))
    args = parser.parse_args()
    events = int(args.events)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / f"log-{events}.parquet"
    if not log.is_file():
        write_log(log, events)
    out = args.workdir / "prepared"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mqsa.cli", "data", "prepare", str(log)]
    cmd += ["--out", str(out), "--memory-gb", str(args.memory_gb)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    print(run.stdout)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr)[1]
    print(f"events {events:,}: wall {wall}, peak RSS {rss / 1e6:.2f} GB (--memory-gb {args.memory_gb})")


if __name__ == "__main__":
    main()
