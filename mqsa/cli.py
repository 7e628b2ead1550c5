"""The ``mqsa`` command. Subcommands import their heavy modules lazily.

mqsa data prepare LOG --out DIR [--k 5]
mqsa data synth --out DIR [--users 2000 --items 500 --seed 0 --raw-log]
mqsa data stats PATH
mqsa train --data PATH --out DIR [hyperparameters]
mqsa evaluate --checkpoint CKPT --data PATH
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path


def _data_prepare(args: argparse.Namespace) -> None:
    from training.prepare import prepare

    summary = prepare(
        args.log,
        args.out,
        k=args.k,
        min_users=args.min_users,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/sequences.txt, items.json, users.json")


def _data_synth(args: argparse.Namespace) -> None:
    from training.synth import write_synthetic

    path = write_synthetic(
        args.out,
        num_users=args.users,
        num_items=args.items,
        num_clusters=args.clusters,
        mean_length=args.mean_length,
        transition_prob=args.transition_prob,
        seed=args.seed,
        raw_log=args.raw_log,
    )
    print(f"wrote {path}")


def _data_stats(args: argparse.Namespace) -> None:
    from training.sequences import read_sequences, sequence_stats
    from training.vocabulary import vocabulary_for

    data = read_sequences(args.path)
    data.num_items = max(data.num_items, len(vocabulary_for(args.path, data.num_items)))
    for key, value in sequence_stats(data).items():
        shown = (
            f"{value:.6%}" if key == "density" else (f"{value:.2f}" if isinstance(value, float) else value)
        )
        print(f"{key:>14}  {shown}")


def _train(args: argparse.Namespace) -> None:
    from training.trainer import TrainConfig, train

    model_config = {
        "max_len": args.max_len,
        "hidden_size": args.hidden_size,
        "num_blocks": args.num_blocks,
        "num_heads": args.num_heads,
        "dropout": args.dropout,
        "windows": tuple(args.window),
        "alpha": args.alpha,
        "learn_alpha": args.learn_alpha,
        "window_decay": args.window_decay,
        "linear_init": args.linear_init,
    }
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    metrics = train(args.data, args.out, model_config, config, progress=not args.quiet, resume=args.resume)
    print(
        f"best epoch {metrics['best_epoch']}; checkpoint {args.out}/best.pt; metrics {args.out}/metrics.json"
    )


def _evaluate(args: argparse.Namespace) -> None:
    from training.scoring import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from training.report import results_table

        print(results_table(result, "test"))
        print(results_table(result, "valid"))


def _export(args: argparse.Namespace) -> None:
    from training.export import export_bundle

    manifest = export_bundle(
        args.checkpoint,
        args.out,
        index=args.index,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        popular_top=args.popular_top,
        force=args.force,
    )
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(
        f"wrote {args.out}: model_version {manifest['model_version']}, {manifest['num_items']} items, "
        f"{manifest['index']['type']} index, {size / 1e6:.1f} MB, {manifest['export_seconds']:.1f}s"
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    # Every worker builds its app from the environment, so the flags travel through it.
    os.environ["MQSA_BUNDLE_DIR"] = str(args.bundle)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
    )


def _data_export_events(args: argparse.Namespace) -> None:
    from service.event_log import export_events_sync
    from service.store import stream_keys

    url = args.redis_url or os.environ.get("MQSA_REDIS_URL", "redis://127.0.0.1:6379/0")
    cluster = args.cluster or os.environ.get("MQSA_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    rows = export_events_sync(url, stream_keys(args.prefix, args.stream_shards), args.out, cluster=cluster)
    print(f"wrote {rows} events to {args.out} (the raw log format `mqsa data prepare` reads)")


def _demo(args: argparse.Namespace) -> None:
    from mqsa.demo import run_demo

    run_demo(
        args.workdir,
        data=args.data,
        epochs=args.epochs,
        port=args.port,
        redis_url=args.redis_url,
        keep_running=not args.no_wait,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqsa", description="MQSA-TED sequential recommender.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, generate and inspect interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="raw log (CSV/Parquet) -> k-core -> sequences + vocabulary")
    p.add_argument("log", help="CSV (.csv, .tsv, .csv.gz) or Parquet file with user, item, timestamp columns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--k", type=int, default=5, help="k-core threshold for users and items (default 5)")
    p.add_argument("--min-users", type=int, default=2, help="fail if fewer users remain (default 2)")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.set_defaults(func=_data_prepare)
    p = data_sub.add_parser("synth", help="seeded synthetic data with planted transitions and taste clusters")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--mean-length", type=int, default=12)
    p.add_argument("--transition-prob", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-log", action="store_true", help="also write interactions.csv for `data prepare`")
    p.set_defaults(func=_data_synth)
    p = data_sub.add_parser("export-events", help="the service's event stream in Redis -> raw log CSV")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--redis-url", default=None, help="default: $MQSA_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default=os.environ.get("MQSA_REDIS_PREFIX", "mqsa"), help="MQSA_REDIS_PREFIX")
    p.add_argument(
        "--stream-shards",
        type=int,
        default=int(os.environ.get("MQSA_STREAM_SHARDS", "16")),
        help="the service's MQSA_STREAM_SHARDS (default 16)",
    )
    p.add_argument(
        "--cluster", action="store_true", help="the URL names a Redis Cluster node (MQSA_REDIS_CLUSTER)"
    )
    p.set_defaults(func=_data_export_events)
    p = data_sub.add_parser("stats", help="users, items, actions, lengths, density")
    p.add_argument("path", help="sequence file")
    p.set_defaults(func=_data_stats)

    t = sub.add_parser("train", help="train MQSA-TED (defaults: the paper's hyperparameters)")
    t.add_argument("--data", required=True, help="sequence file (items.json beside it is used if present)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--max-len", type=int, default=50, help="T")
    t.add_argument("--hidden-size", type=int, default=64, help="d")
    t.add_argument("--num-blocks", type=int, default=1)
    t.add_argument("--num-heads", type=int, default=1)
    t.add_argument("--dropout", type=float, default=0.5)
    t.add_argument(
        "--window", type=int, nargs="+", default=[3], help="L; several values, several long branches"
    )
    t.add_argument("--alpha", type=float, default=0.5, help="short-branch weight (1 = SASRec)")
    t.add_argument("--learn-alpha", action="store_true")
    t.add_argument("--window-decay", type=float, default=1.0, help="1 = plain window mean")
    t.add_argument(
        "--linear-init",
        default="torch",
        choices=["torch", "glorot"],
        help="attention/FFN layer init: PyTorch's default or Glorot weights with zero biases (TF's)",
    )
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--adam-beta2", type=float, default=0.999, help="Adam's second-moment decay")
    t.add_argument("--l2", type=float, default=1e-4)
    t.add_argument("--lambda-kd", type=float, default=0.1, help="TED weight (0 = no TED)")
    t.add_argument("--tau", type=float, default=0.1)
    t.add_argument("--time-span", type=int, default=1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--eval-every", type=int, default=1)
    t.add_argument("--patience", type=int, default=0, help="evaluations without improvement (0 = off)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    t.add_argument(
        "--resume",
        action="store_true",
        help="go on from OUT/last.pt (written after every epoch) with the same settings; "
        "--epochs, --patience and --threads may change",
    )
    t.set_defaults(func=_train)

    x = sub.add_parser("export", help="checkpoint -> serving bundle (ONNX encoder, FAISS index, manifest)")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="bundle directory (written atomically)")
    x.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"], help="flat = exact (default)")
    x.add_argument("--nlist", type=int, default=None, help="ivf lists (default 4 * sqrt(items))")
    x.add_argument("--nprobe", type=int, default=16, help="ivf lists searched per query")
    x.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node")
    x.add_argument("--ef-search", type=int, default=128, help="hnsw search breadth")
    x.add_argument("--popular-top", type=int, default=1000, help="items kept in popular.json")
    x.add_argument("--force", action="store_true", help="replace an existing bundle")
    x.set_defaults(func=_export)

    s = sub.add_parser("serve", help="serve a bundle over HTTP (settings also from MQSA_* variables)")
    s.add_argument("--bundle", required=True, help="bundle directory written by `mqsa export`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="synthetic data -> train -> export -> Redis -> serve -> a recommendation")
    d.add_argument("--data", type=Path, default=None, help="a sequence file instead of synthetic data")
    d.add_argument("--workdir", type=Path, default=Path("demo"), help="where data, run and bundle go")
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--redis-url", default=None, help="default: $MQSA_REDIS_URL, else a throwaway Redis")
    d.add_argument("--no-wait", action="store_true", help="stop the service after the recommendation")
    d.set_defaults(func=_demo)

    e = sub.add_parser("evaluate", help="full-ranking HR/NDCG@5/10/20 of a checkpoint, with baselines")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="the sequence file it was trained on")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input (DataError is a ValueError): one clear line, no traceback.
        print(f"mqsa: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
