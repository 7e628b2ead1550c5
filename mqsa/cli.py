"""The ``mqsa`` command. Subcommands import their heavy modules lazily.

    mqsa data prepare LOG --out DIR [--k 5 ...]
    mqsa data synth --out DIR [--users 2000 --items 500 ... --raw-log]
    mqsa data synth-log --preset S1|S2|S3 --out FILE.parquet [one flag per ScaleLogConfig field]
    mqsa data stats PATH
    mqsa data export-events --out FILE
    mqsa events archive --to URL [--once]
    mqsa train --data PATH --out DIR [--config FILE] [one flag per MQSAConfig and TrainConfig field]
    mqsa tune --data PATH --out DIR [--config FILE] [one flag per TuneConfig field: --trials N ...]
    mqsa evaluate --checkpoint CKPT --data PATH
    mqsa evaluate --holdout LOG --holdout-since T MODEL [MODEL ...]   (checkpoints or bundles)
    mqsa evaluate --online --archive URL --since T [--until T] [--bundle B ...]   (past traffic)
    mqsa export --checkpoint CKPT --out DIR [one flag per ExportConfig field]
    mqsa serve --bundle DIR
    mqsa demo
    mqsa keys new --scopes read,write
    mqsa promote CANDIDATE --bundles ROOT --holdout LOG --holdout-since T [--tolerance 0.01 ...]
    mqsa rollback --bundles ROOT
    mqsa versions --bundles ROOT

The settings flags are made from the config dataclasses (``mqsa.flags``): their
defaults and help have one source (``train --config FILE`` reads them from a settings
file, ``training.settings_file``, under the flags given). Those of ``train``, ``tune``
and ``export`` need torch (and ``tune`` Optuna) and those of ``data prepare`` and
``data synth`` pandas, so each is added only when its subcommand runs (``mqsa serve``
and ``mqsa data export-events`` need neither).
The project's own errors (``mqsa.errors.MQSAError``) are printed in one line with
their exit code (2; 3 for a candidate the quality gate refused); anything else keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mqsa import flags
from mqsa.errors import ConfigError, MQSAError

MODEL_EXCLUDE = ("num_items",)  # from the data, never a flag
ALIASES = {"windows": ["--window"]}  # older flag names that still work


def _data_prepare(args: argparse.Namespace) -> None:
    from mqsa.training.prepare import PrepareConfig, prepare

    summary = prepare(args.log, args.out, PrepareConfig(**flags.values(args, PrepareConfig)))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/sequences.txt, items.json, users.json")


def _data_synth(args: argparse.Namespace) -> None:
    from mqsa.training.synth import SynthConfig, write_synthetic

    path = write_synthetic(args.out, SynthConfig(**flags.values(args, SynthConfig)), raw_log=args.raw_log)
    print(f"wrote {path}")


def _data_synth_log(args: argparse.Namespace) -> None:
    from mqsa.training.scale_log import ScaleLogConfig, write_scale_log

    summary = write_scale_log(args.out, ScaleLogConfig(**flags.values(args, ScaleLogConfig)))
    print(
        f"wrote {summary['path']}: {summary['rows']} rows, {summary['users']} users, "
        f"{summary['items']} items, {summary['row_groups']} row groups, {summary['seconds']:.1f}s"
    )


def _data_stats(args: argparse.Namespace) -> None:
    from mqsa.training.sequences import read_sequences, sequence_stats
    from mqsa.training.vocabulary import vocabulary_for

    data = read_sequences(args.path)
    data.num_items = len(vocabulary_for(args.path, data.num_items))  # items.json may list unused items
    for key, value in sequence_stats(data).items():
        shown = (
            f"{value:.6%}" if key == "density" else (f"{value:.2f}" if isinstance(value, float) else value)
        )
        print(f"{key:>14}  {shown}")


def _data_export_events(args: argparse.Namespace) -> None:
    from mqsa.service.event_log import export_events_sync
    from mqsa.service.store import stream_keys

    url, cluster = _redis_of(args)
    rows = export_events_sync(url, stream_keys(args.prefix, args.stream_shards), args.out, cluster=cluster)
    print(f"wrote {rows} events to {args.out} (the raw log format `mqsa data prepare` reads)")


def _train(args: argparse.Namespace) -> None:
    from mqsa.models.mqsa import MQSAConfig
    from mqsa.training.trainer import TrainConfig, train

    model_config = flags.values(args, MQSAConfig, MODEL_EXCLUDE)
    config = TrainConfig(**flags.values(args, TrainConfig))
    metrics = train(args.data, args.out, model_config, config, progress=not args.quiet, resume=args.resume)
    print(
        f"best epoch {metrics['best_epoch']}; checkpoint {args.out}/best.pt; metrics {args.out}/metrics.json"
    )


def _tune(args: argparse.Namespace) -> None:
    from mqsa.training.settings_file import read_settings_file
    from mqsa.training.tune import TuneConfig, tune

    base = read_settings_file(args.config) if args.config else {}
    config = TuneConfig(**flags.values(args, TuneConfig))
    try:
        summary = tune(args.data, args.out, config, base, progress=not args.quiet)
    except KeyboardInterrupt:
        print("\nmqsa tune: interrupted; the same command resumes the study", file=sys.stderr)
        raise SystemExit(130) from None
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items())
    best = summary["best"]
    found = "no complete trial yet"
    if best:
        found = f"best trial {best['trial']}, validation NDCG@20 {best['value']:.4f}; {args.out}/best.toml"
    print(f"{counts}; {found}; report {summary['report']}")


def _with_settings_file(argv: list[str], path: str) -> argparse.Namespace:
    """``mqsa train``'s arguments again, with the settings file's values as the flags' defaults.

    So a flag given on the command line overrides the file, and the file overrides the
    dataclass defaults. Raises the file's DataError or ConfigError (unknown keys named).
    """
    from mqsa.training.settings_file import read_settings_file

    values = read_settings_file(path)
    as_parsed = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # nargs gives lists
    return _parsed_with_defaults(argv, ("train",), as_parsed)


def _with_preset(argv: list[str], preset: str) -> argparse.Namespace:
    """``mqsa data synth-log``'s arguments again, with the preset's values as the flags' defaults."""
    import dataclasses

    from mqsa.training.scale_log import PRESETS

    return _parsed_with_defaults(argv, ("data", "synth-log"), dataclasses.asdict(PRESETS[preset]))


def _parsed_with_defaults(argv: list[str], words: Sequence[str], defaults: dict) -> argparse.Namespace:
    """``argv`` parsed again with ``defaults`` for the flags of the subcommand ``words`` names.

    A flag given on the command line still wins over its new default.
    """
    parser = build_parser(argv[:2])
    command: argparse.ArgumentParser = parser
    for word in words:
        subcommands = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
        command = subcommands.choices[word]
    command.set_defaults(**defaults)
    return parser.parse_args(argv)


def _evaluate(args: argparse.Namespace) -> None:
    if args.online:
        return _evaluate_online(args)
    if args.archive or args.since or args.until or args.bundle or args.report:
        raise ConfigError("--archive, --since, --until, --bundle and --report go with --online")
    if args.holdout or args.models:
        return _evaluate_holdout(args)
    if not (args.checkpoint and args.data):
        raise ConfigError("evaluate needs --checkpoint and --data, or --holdout, --holdout-since and models")
    from mqsa.training.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from mqsa.training.report import results_table

        print(results_table(result, "test"))
        print(results_table(result, "valid"))


def _evaluate_holdout(args: argparse.Namespace) -> None:
    from mqsa.training.holdout import evaluate_on_holdout, holdout_table

    if not (args.holdout and args.holdout_since and args.models):
        raise ConfigError("a holdout evaluation needs --holdout, --holdout-since and one or more models")
    if args.checkpoint or args.data:
        raise ConfigError("name the models after the flags (not --checkpoint/--data) on a holdout")
    result = evaluate_on_holdout(args.holdout, args.holdout_since, args.models, context=args.holdout_context)
    print(json.dumps(result, indent=2) if args.json else holdout_table(result))


def _evaluate_online(args: argparse.Namespace) -> None:
    from mqsa.training.replay import ReplayConfig, replay, replay_table

    if not (args.archive and args.since):
        raise ConfigError("an online replay needs --archive and --since")
    if args.checkpoint or args.data or args.models or args.holdout or args.holdout_since:
        raise ConfigError("--online replays the archive: no --checkpoint, --data, --holdout or models")
    config = ReplayConfig(**flags.values(args, ReplayConfig))
    result = replay(args.archive, args.since, args.until, config, args.bundle or ())
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2) if args.json else replay_table(result))


def _promote(args: argparse.Namespace) -> None:
    from mqsa.errors import PromotionRefused
    from mqsa.training.holdout import holdout_table
    from mqsa.training.promote import Gate, promote

    gate = Gate(**flags.values(args, Gate))
    outcome = promote(
        args.candidate, args.bundles, args.holdout, args.holdout_since, gate, context=args.holdout_context
    )
    print(json.dumps(outcome.report, indent=2) if args.json else holdout_table(outcome.report))
    if not outcome.promoted:
        serving = outcome.serving or "nothing"
        raise PromotionRefused(
            f"refused {outcome.candidate}: {'; '.join(outcome.reasons)}; still serving {serving} "
            f"(report: {outcome.report_path})"
        )
    pruned = f"; removed old versions {', '.join(outcome.removed)}" if outcome.removed else ""
    was = outcome.serving or "nothing"
    print(f"promoted: {args.bundles}/current -> versions/{outcome.candidate} (was {was}){pruned}")


def _rollback(args: argparse.Namespace) -> None:
    from mqsa.service.versions import rollback

    was, now = rollback(args.bundles, os.environ.get("MQSA_BUNDLE_HMAC_KEY") or None)
    print(f"rolled back: {args.bundles}/current -> versions/{now} (was {was})")


def _versions(args: argparse.Namespace) -> None:
    from mqsa.service.versions import list_versions

    rows = list_versions(args.bundles)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        served = row["last_served"] or "never"
        print(f"{row['version']:<18} {row['role']:<9} created {row['created_at']}  last served {served}")


def _export(args: argparse.Namespace) -> None:
    from mqsa.training.export import ExportConfig, export_bundle

    config = ExportConfig(**flags.values(args, ExportConfig))
    hmac_key = os.environ.get("MQSA_BUNDLE_HMAC_KEY") or None  # a secret: never a flag
    manifest = export_bundle(args.checkpoint, args.out, config, force=args.force, hmac_key=hmac_key)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(
        f"wrote {args.out}: model_version {manifest['model_version']}, {manifest['num_items']} items, "
        f"{manifest['index']['type']} index, {size / 1e6:.1f} MB, {manifest['export_seconds']:.1f}s"
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mqsa.service.bundle import verify_bundle
    from mqsa.service.server import protocol_class
    from mqsa.service.settings import load_settings

    # Every worker builds its app from the environment, so the flags travel through it.
    os.environ["MQSA_BUNDLE_DIR"] = str(args.bundle)
    settings = load_settings()  # a bad setting or bundle: one line here, not in each worker
    hmac_key = settings.bundle_hmac_key.get_secret_value() if settings.bundle_hmac_key else None
    verify_bundle(settings.bundle_dir, hmac_key)
    uvicorn.run(
        "mqsa.service.app:create_app",
        factory=True,
        http=protocol_class(),  # uvicorn's, with a time limit on request headers
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
    )


def _catalogue_load(args: argparse.Namespace) -> None:
    import httpx

    from mqsa.catalogue_file import read_catalogue

    records = read_catalogue(args.file)
    key = os.environ.get("MQSA_API_KEY")  # a secret: never a flag
    headers = {"X-API-Key": key} if key else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=30) as http:
            for start in range(0, len(records), args.batch):
                answer = http.put("/items", json={"items": records[start : start + args.batch]})
                if answer.status_code != 200:
                    where = f"items {start + 1}-{start + args.batch} of {args.file}"
                    raise MQSAError(
                        f"PUT /items answered {answer.status_code} for {where}: {answer.text[:500]}"
                    )
    except httpx.HTTPError as exc:
        raise MQSAError(f"cannot reach {args.url}: {exc}") from exc
    print(f"loaded {len(records)} items from {args.file} into {args.url}")


def _keys_new(args: argparse.Namespace) -> None:
    from mqsa.service.keys import Scope, entry, new_key

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in Scope.__members__.values()]
    if not scopes or unknown:
        raise ConfigError(f"--scopes takes read, write and admin, comma-separated; got {args.scopes!r}")
    key = new_key()
    print(f"key (give it to the client; it is shown once): {key}")
    print(f"entry for MQSA_API_KEYS (the service keeps only this): {entry(key, scopes)}")


def _demo(args: argparse.Namespace) -> None:
    from mqsa.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**flags.values(args, DemoConfig)), keep_running=not args.no_wait)


def _redis_of(args: argparse.Namespace) -> tuple[str, bool]:
    """The Redis URL and cluster flag: the flags, else MQSA_REDIS_URL / MQSA_REDIS_CLUSTER."""
    url = args.redis_url or os.environ.get("MQSA_REDIS_URL", "redis://127.0.0.1:6379/0")
    cluster = args.cluster or os.environ.get("MQSA_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    return url, cluster


def _add_redis_flags(p: argparse.ArgumentParser) -> None:
    """Where the service's streams are: the flags default to the service's MQSA_* variables."""
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


def _events_archive(args: argparse.Namespace) -> None:
    from mqsa.service.archive import run_archiver
    from mqsa.service.store import stream_keys

    if not args.once:  # a daemon: its progress and its recoveries go to the log
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url, cluster = _redis_of(args)
    streams = stream_keys(args.prefix, args.stream_shards)
    poll = None if args.once else args.poll_seconds
    result = run_archiver(url, streams, args.to, args.batch, poll, cluster)
    print(f"archived {result.archived} events in {result.files} files to {args.to}")


def _add_events(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    e = sub.add_parser("events", help="the service's event streams")
    e_sub = e.add_subparsers(dest="events_command", required=True)
    a = e_sub.add_parser(
        "archive", help="event streams -> date-partitioned Parquet, exactly once (with MQSA_STREAM_ARCHIVE)"
    )
    a.add_argument("--to", required=True, help="a folder or an fsspec URL (s3://bucket/events, gs://...)")
    a.add_argument("--batch", type=int, default=10_000, help="the most events per file (default 10000)")
    a.add_argument(
        "--poll-seconds", type=float, default=1.0, help="rest after a pass that found nothing (default 1)"
    )
    a.add_argument("--once", action="store_true", help="archive what is there now, then stop")
    _add_redis_flags(a)
    a.set_defaults(func=_events_archive)


def _add_data(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    data = sub.add_parser("data", help="prepare, generate and inspect interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "prepare", help="raw log (CSV/Parquet) or event archive -> k-core -> sequences + vocabulary"
    )
    p.add_argument(
        "log",
        help="CSV (.csv, .tsv, .csv.gz) or Parquet file with user, item, timestamp columns, or an event "
        "archive (the folder or URL given to `mqsa events archive --to`)",
    )
    p.add_argument("--out", required=True, help="output directory")
    if full("data", "prepare"):  # pandas: only for this subcommand (export-events runs without it)
        from mqsa.training.prepare import PrepareConfig

        flags.add_flags(p, PrepareConfig)
    p.set_defaults(func=_data_prepare)
    p = data_sub.add_parser("synth", help="seeded synthetic data: bundles of items, users' tastes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--raw-log", action="store_true", help="also write interactions.csv for `data prepare`")
    if full("data", "synth"):
        from mqsa.training.synth import SynthConfig

        flags.add_flags(p, SynthConfig)
    p.set_defaults(func=_data_synth)
    p = data_sub.add_parser(
        "synth-log", help="a large seeded Zipf log (Parquet) for `data prepare`: presets S1, S2, S3"
    )
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument(
        "--preset",
        choices=("S1", "S2", "S3"),
        default="S1",
        help="the settings' defaults (sizes in docs/scaling.md); flags given override them (default: S1)",
    )
    if full("data", "synth-log"):  # numpy and pyarrow: only for this subcommand
        from mqsa.training.scale_log import ScaleLogConfig

        flags.add_flags(p, ScaleLogConfig)
    p.set_defaults(func=_data_synth_log)
    p = data_sub.add_parser("export-events", help="the service's event stream in Redis -> raw log CSV")
    p.add_argument("--out", required=True, help="CSV file to write")
    _add_redis_flags(p)
    p.set_defaults(func=_data_export_events)
    p = data_sub.add_parser("stats", help="users, items, actions, lengths, density")
    p.add_argument("path", help="sequence file")
    p.set_defaults(func=_data_stats)


def _add_train(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    t = sub.add_parser("train", help="train MQSA-TED (defaults: the paper's hyperparameters)")
    t.add_argument("--data", required=True, help="sequence file (items.json beside it is used if present)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    t.add_argument(
        "--resume",
        action="store_true",
        help="go on from OUT/last.pt (written after every epoch) with the same settings; "
        "--epochs, --patience and --threads may change",
    )
    t.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (TOML or JSON; keys are the settings below with underscores, e.g. lr, "
        "windows; `mqsa tune` writes one as best.toml); flags given here override it",
    )
    if full("train"):
        from mqsa.models.mqsa import MQSAConfig
        from mqsa.training.trainer import TrainConfig

        flags.add_flags(t, MQSAConfig, MODEL_EXCLUDE, aliases=ALIASES)
        flags.add_flags(t, TrainConfig)
    t.set_defaults(func=_train)


def _add_tune(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    t = sub.add_parser(
        "tune", help="search the settings on the validation split (Optuna; resumable; docs/tuning.md)"
    )
    t.add_argument("--data", required=True, help="sequence file (items.json beside it is used if present)")
    t.add_argument("--out", required=True, help="output directory: study.db, trials/, best.toml, report.md")
    t.add_argument(
        "--config",
        metavar="FILE",
        help="base settings (a settings file as for `mqsa train --config`); the searched ones are drawn "
        "on top",
    )
    t.add_argument("--quiet", action="store_true", help="no line per trial")
    if full("tune"):  # torch and optuna: only for this subcommand
        from mqsa.training.tune import TuneConfig

        flags.add_flags(t, TuneConfig)
    t.set_defaults(func=_tune)


def _add_export(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    x = sub.add_parser("export", help="checkpoint -> serving bundle (ONNX encoder, FAISS index, manifest)")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="bundle directory (written atomically)")
    x.add_argument("--force", action="store_true", help="replace an existing bundle")
    if full("export"):
        from mqsa.training.export import ExportConfig

        flags.add_flags(x, ExportConfig)
    x.set_defaults(func=_export)


def _add_serve(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    s = sub.add_parser("serve", help="serve a bundle over HTTP (settings also from MQSA_* variables)")
    s.add_argument("--bundle", required=True, help="bundle directory written by `mqsa export`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_serve)


def _add_demo(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    d = sub.add_parser("demo", help="synthetic data -> train -> export -> Redis -> serve -> a recommendation")
    d.add_argument("--no-wait", action="store_true", help="stop the service after the recommendation")
    if full("demo"):
        from mqsa.demo import DemoConfig

        flags.add_flags(d, DemoConfig)
    d.set_defaults(func=_demo)


def _add_catalogue(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    c = sub.add_parser(
        "catalogue", help="the items' categories, labels and availability, in a running service"
    )
    c_sub = c.add_subparsers(dest="catalogue_command", required=True)
    load = c_sub.add_parser("load", help="send a catalogue file (JSONL, CSV, Parquet) to PUT /items")
    load.add_argument("file", type=Path, help="see mqsa/catalogue_file.py for the columns")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the service (key in $MQSA_API_KEY)")
    load.add_argument("--batch", type=int, default=1000, help="items per request (at most 1000)")
    load.set_defaults(func=_catalogue_load)


def _add_keys(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    k = sub.add_parser("keys", help="API keys for the service (MQSA_API_KEYS)")
    k_sub = k.add_subparsers(dest="keys_command", required=True)
    n = k_sub.add_parser("new", help="a fresh random key and its MQSA_API_KEYS entry (scopes + sha256)")
    n.add_argument("--scopes", required=True, help="comma-separated: read (recommend), write (events), admin")
    n.set_defaults(func=_keys_new)


def _add_evaluate(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    e = sub.add_parser(
        "evaluate",
        help="full-ranking HR/NDCG@5/10/20 of a checkpoint, with baselines (--online: of past traffic)",
    )
    e.add_argument("--checkpoint", help="leave-one-out: the checkpoint (with --data)")
    e.add_argument("--data", help="leave-one-out: the sequence file it was trained on")
    e.add_argument("models", nargs="*", help="on a holdout: checkpoints (.pt) or bundle directories")
    _add_holdout_flags(e, required=False)
    e.add_argument("--json", action="store_true", help="print JSON")
    o = e.add_argument_group("online replay (docs/feedback.md): the online metrics of past traffic")
    o.add_argument("--online", action="store_true", help="replay the event archive's impressions and events")
    o.add_argument("--archive", help="the archive (the folder or URL given to `mqsa events archive --to`)")
    o.add_argument("--since", help="the window's start (unix seconds, ISO date, or 7d/12h before now)")
    o.add_argument("--until", help="the window's end, excluded (the same forms; default: now)")
    o.add_argument(
        "--bundle",
        nargs="+",
        metavar="B",
        help="bundles that make the window's served /recommend lists again (counterfactual); "
        "their item counts give the coverage",
    )
    o.add_argument("--report", metavar="PATH", help="also write the result as JSON to PATH")
    if full("evaluate"):  # pandas: only for this subcommand
        from mqsa.training.replay import ReplayConfig

        flags.add_flags(e, ReplayConfig)
    e.set_defaults(func=_evaluate)


def _add_holdout_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--holdout", required=required, help="raw log (CSV/Parquet: user_id, item_id, timestamp) or archive"
    )
    p.add_argument(
        "--holdout-since",
        required=required,
        help="the holdout: every event at or after this (unix seconds, ISO date, 7d/12h before the newest)",
    )
    p.add_argument(
        "--holdout-context",
        default=None,
        help="read only the events from this time on (90d before now, an ISO date, unix seconds): "
        "contexts and baselines from that window; bounds the memory of reading an archive (default: all)",
    )


def _add_versions(sub: argparse._SubParsersAction, full: Callable[..., bool]) -> None:
    p = sub.add_parser("promote", help="serve a bundle only if it beats the serving one on a recent holdout")
    p.add_argument("candidate", help="the bundle directory `mqsa export` wrote")
    p.add_argument("--bundles", required=True, help="the bundle root: versions/, current, history.json")
    _add_holdout_flags(p, required=True)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if full("promote"):  # torch and pandas: only for this subcommand
        from mqsa.training.promote import Gate

        flags.add_flags(p, Gate)
    p.set_defaults(func=_promote)
    r = sub.add_parser("rollback", help="switch ROOT/current back to the version before it")
    r.add_argument("--bundles", required=True, help="the bundle root")
    r.set_defaults(func=_rollback)
    v = sub.add_parser("versions", help="the bundle versions kept under ROOT, the current one marked")
    v.add_argument("--bundles", required=True, help="the bundle root")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_versions)


README_MARKERS = ("<!-- settings: generated by `make readme-settings` -->", "<!-- settings: end -->")
SERVICE_MARKERS = (
    "<!-- service settings: generated by `make readme-settings` -->",
    "<!-- service settings: end -->",
)


def readme_settings() -> str:
    """The README's settings tables, from the config dataclasses: the flags of train, tune, export."""
    from mqsa.models.mqsa import MQSAConfig
    from mqsa.training.export import ExportConfig
    from mqsa.training.trainer import TrainConfig
    from mqsa.training.tune import TuneConfig

    train = flags.settings_table([(MQSAConfig, MODEL_EXCLUDE), (TrainConfig, ())])
    tune = flags.settings_table([(TuneConfig, ())])
    export = flags.settings_table([(ExportConfig, ())])
    return f"`mqsa train`:\n\n{train}\n`mqsa tune`:\n\n{tune}\n`mqsa export`:\n\n{export}"


def service_settings() -> str:
    """The README's table of the service's environment variables, from ``Settings``."""
    from pydantic import SecretStr

    from mqsa.service.settings import Settings

    helps = flags.attribute_help(Settings)
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        value = value.get_secret_value() if isinstance(value, SecretStr) else value
        value = ",".join(value) if isinstance(value, list) and value else value  # as the variable is written
        default = f"`{flags.shown(value)}`" if value not in (None, []) else "(none)"
        default = "(required)" if info.is_required() else default
        meaning = helps[name].replace("|", "\\|")
        rows.append(f"| `MQSA_{name.upper()}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    start, end = text.index(markers[0]), text.index(markers[1])
    return f"{text[: start + len(markers[0])]}\n{body}{text[end:]}"


def write_readme_settings(path: str | Path) -> None:
    """Rewrite the README's generated tables: the CLI's settings and the service's variables."""
    path = Path(path)
    text = replace_between(path.read_text(encoding="utf-8"), README_MARKERS, readme_settings())
    path.write_text(replace_between(text, SERVICE_MARKERS, service_settings()), encoding="utf-8")


def build_parser(argv_head: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; ``argv_head``, the command line's first words, picks whose settings flags
    are added (None: every subcommand's).

    Settings flags come from modules that import torch or pandas, so ``main`` asks only
    for those of the subcommand it runs: ``mqsa serve`` and ``mqsa data export-events``
    run in the service image, which has neither.
    """

    def full(*words: str) -> bool:
        return argv_head is None or list(argv_head[: len(words)]) == list(words)

    parser = argparse.ArgumentParser(prog="mqsa", description="MQSA-TED sequential recommender.")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = (
        _add_data,
        _add_events,
        _add_train,
        _add_tune,
        _add_export,
        _add_serve,
        _add_demo,
        _add_catalogue,
        _add_keys,
        _add_evaluate,
        _add_versions,
    )
    for add in adders:
        add(sub, full)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Returns 0, or an MQSAError's exit code after printing it in one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[:2]).parse_args(argv)
    try:
        if args.command == "train" and args.config:
            args = _with_settings_file(argv, args.config)
        if args.command == "data" and args.data_command == "synth-log":
            args = _with_preset(argv, args.preset)
        args.func(args)
    except MQSAError as exc:
        print(f"mqsa: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
