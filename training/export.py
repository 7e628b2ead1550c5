"""Export a checkpoint as a serving bundle: the contract between trainer and service.

A bundle is a directory:

    encoder.onnx   input item_idx int64 (batch, seq), seq <= T, left-padded with
                   the padding index; outputs short, long float32 (batch, d):
                   the last slot's vectors of the two branches (no blend inside);
                   metadata mqsa.max_len, mqsa.hidden_size, mqsa.num_items, mqsa.padding_idx
    items.faiss    inner-product index over the real items' embeddings, row = item_idx
    items.json     {"format": 1, "item_ids": [...]}: item_idx -> external item_id
    popular.json   {"item_ids": [...], "counts": [...]}: training popularity, most first
    manifest.json  format and model version, creation time, hyperparameters, T, d,
                   alpha, padding index, item count, metrics, index parameters and
                   the sha256 and size of every other file; the model version is the
                   first 16 hex digits of the manifest's own digest (its canonical JSON
                   without model_version and signature), so an edit shows; with an HMAC
                   key, ``signature`` is the HMAC-SHA256 of the rest (format 2)

It is written to a temporary sibling directory and renamed into place, so a
service watching the parent never sees a half-written bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mqsa.errors import ConfigError, DataError
from mqsa.models.mqsa import MQSA
from mqsa.training.artifacts import file_sha256, write_json_atomic, writing
from mqsa.training.checkpoint import Checkpoint
from mqsa.training.vocabulary import Vocabulary

BUNDLE_FORMAT = 2
ONNX_OPSET = 18
INDEX_TYPES = ("flat", "ivf", "hnsw")
BUNDLE_FILES = ("encoder.onnx", "items.faiss", "items.json", "popular.json")  # the manifest lists these
OPTIONAL_FILES = ("catalogue.jsonl",)  # listed (and checked) when the bundle has them


@dataclass
class ExportConfig:
    """How a checkpoint becomes a bundle. ``mqsa export`` makes one flag per field.

    Attributes:
        index: the item index: flat (exact), ivf or hnsw.
        nlist: ivf lists (0 = 4 * sqrt(items)).
        nprobe: ivf lists searched per query.
        hnsw_m: hnsw links per node.
        ef_search: hnsw search breadth.
        popular_top: items kept in popular.json.
        catalogue: a catalogue file (JSONL, CSV or Parquet: mqsa/catalogue_file.py) to put in
            the bundle; a service whose Redis holds no catalogue yet starts from it.
    """

    index: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = 0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    popular_top: int = 1000
    catalogue: Path | None = None

    def __post_init__(self) -> None:
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"index must be one of {INDEX_TYPES}, got {self.index!r}")
        if self.nlist < 0:
            raise ConfigError(f"nlist must be >= 0 (0 = 4 * sqrt(items)), got {self.nlist}")
        for name in ("nprobe", "hnsw_m", "ef_search", "popular_top"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def index_params(self, num_items: int) -> dict[str, int]:
        """The index's parameters, as the manifest records them."""
        if self.index == "ivf":
            return {"nlist": self.nlist or max(1, int(4 * num_items**0.5)), "nprobe": self.nprobe}
        if self.index == "hnsw":
            return {
                "m": self.hnsw_m,
                "ef_construction": max(2 * self.ef_search, 200),
                "ef_search": self.ef_search,
            }
        return {}


class Encoder(torch.nn.Module):
    """The serving path of a model: (B, seq) item indices -> short (B, d), long (B, d)."""

    def __init__(self, model: MQSA) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(item_idx)


def export_onnx(model: MQSA, path: Path, opset: int = ONNX_OPSET) -> None:
    """Write the encoder with dynamic batch and sequence axes, and check it."""
    import onnx

    cfg = model.config
    encoder = Encoder(model).eval()
    example = torch.randint(0, cfg.num_items, (2, cfg.max_len))
    example[0, : cfg.max_len // 2] = cfg.padding_idx
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", min=1, max=cfg.max_len)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # The exporter prints its progress and warns about deprecations inside torch; keep the CLI quiet.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (example,),
            str(path),
            input_names=["item_idx"],
            output_names=["short", "long"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"item_idx": {0: batch, 1: seq}},
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path))
    facts = {"max_len": cfg.max_len, "hidden_size": cfg.hidden_size, "num_items": cfg.num_items}
    facts["padding_idx"] = cfg.padding_idx
    onnx.helper.set_model_props(graph, {f"mqsa.{k}": str(v) for k, v in facts.items()})
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def build_index(embeddings: np.ndarray, kind: str, params: dict[str, int]) -> Any:
    """An inner-product FAISS index over (N, d) float32 embeddings, row = item index.

    Args:
        kind: "flat" (exact), "ivf" (params nlist, nprobe) or "hnsw" (params m,
            ef_construction, ef_search).
    """
    import faiss

    n, d = embeddings.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = params["nlist"]
        if nlist > n:
            raise ConfigError(f"ivf nlist ({nlist}) must not exceed the item count ({n})")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        raise ConfigError(f"index must be one of {INDEX_TYPES}, got {kind!r}")
    index.add(embeddings)
    return index


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, ``model_version`` and ``signature`` left out."""
    body = {k: v for k, v in manifest.items() if k not in ("model_version", "signature")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_signature(manifest: dict[str, Any], key: str) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of everything but the signature."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key.encode(), canonical, hashlib.sha256).hexdigest()


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: ExportConfig | None = None,
    force: bool = False,
    hmac_key: str | None = None,
) -> dict[str, Any]:
    """Write a serving bundle for a checkpoint; returns its manifest (with ``export_seconds``).

    With ``hmac_key`` (``mqsa export`` takes it from ``MQSA_BUNDLE_HMAC_KEY``) the
    manifest is signed, and a service configured with the same key loads only signed bundles.

    Raises:
        DataError: the checkpoint is missing, unreadable or lacks the vocabulary, or
            ``out_dir`` exists and ``force`` is not set.
        ConfigError: index parameters that do not fit the model.
    """
    config = config or ExportConfig()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not force:
        raise DataError("the bundle directory exists (use --force to replace it)", out_dir)
    started = time.perf_counter()
    ckpt = Checkpoint.load(checkpoint)
    model = ckpt.build_model()
    num_items = model.config.num_items
    if ckpt.item_ids is None or len(ckpt.item_ids) != num_items or len(ckpt.item_counts) != num_items:
        raise DataError("the checkpoint has no item vocabulary or counts of the right size", checkpoint)
    catalogue = None
    if config.catalogue is not None:  # read first: a bad file fails before the long part
        # The seed's records are the API's item objects, checked by the service's own schema.
        from mqsa.catalogue_file import read_catalogue

        catalogue = read_catalogue(config.catalogue)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        params = _write_files(model, ckpt, config, tmp)
        if catalogue is not None:
            from mqsa.catalogue_file import write_jsonl

            write_jsonl(catalogue, tmp / "catalogue.jsonl")
        manifest = _manifest(model, ckpt, {"type": config.index, "metric": "inner_product", **params}, tmp)
        if hmac_key:
            manifest["signature"] = manifest_signature(manifest, hmac_key)
        write_json_atomic(tmp / "manifest.json", manifest, indent=1)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "export_seconds": time.perf_counter() - started}


def _write_files(model: MQSA, ckpt: Checkpoint, config: ExportConfig, out: Path) -> dict[str, int]:
    """The encoder, the index, the vocabulary and the popular items into ``out``; returns the index params."""
    import faiss

    export_onnx(model, out / "encoder.onnx")
    embeddings = np.ascontiguousarray(model.item_embeddings().detach().cpu().numpy(), dtype=np.float32)
    params = config.index_params(model.config.num_items)
    faiss.write_index(build_index(embeddings, config.index, params), str(out / "items.faiss"))
    Vocabulary(ckpt.item_ids).save(out / "items.json")  # the format `mqsa data prepare` writes
    counts = np.asarray(ckpt.item_counts, dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # most popular first, ties by index
    order = order[counts[order] > 0][: config.popular_top]
    popular = {"item_ids": [ckpt.item_ids[i] for i in order], "counts": counts[order].tolist()}
    write_json_atomic(out / "popular.json", popular, indent=1)
    return params


def _manifest(model: MQSA, ckpt: Checkpoint, index: dict[str, Any], out: Path) -> dict[str, Any]:
    """The manifest of the files in ``out``; the model version is the digest of the rest of it."""
    cfg = model.config
    names = [*BUNDLE_FILES, *(name for name in OPTIONAL_FILES if (out / name).is_file())]
    files = {
        name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size} for name in names
    }
    manifest = {
        "format_version": BUNDLE_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "max_len": cfg.max_len,
        "hidden_size": cfg.hidden_size,
        "alpha": float(model.alpha.detach()),
        "padding_idx": cfg.padding_idx,
        "num_items": cfg.num_items,
        "model_config": cfg.to_dict(),
        "train_config": ckpt.train_config,
        "metrics": {"epoch": ckpt.best.epoch, "valid": ckpt.best.valid, "test": ckpt.best.test},
        "data": ckpt.data,
        "encoder": {"opset": ONNX_OPSET, "input": "item_idx", "outputs": ["short", "long"]},
        "index": index,
        "files": files,
    }
    return {"model_version": manifest_digest(manifest)[:16], **manifest}


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing bundle is swapped out, then removed."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
