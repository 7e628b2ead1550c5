"""Export a checkpoint as a serving bundle: the contract between trainer and service.

A bundle is a directory:

    encoder.onnx   input item_idx int64 (batch, seq), seq <= T, left-padded with
                   the padding index; outputs short, long float32 (batch, d):
                   the last slot's vectors of the two branches (no blend inside)
    items.faiss    inner-product index over the real items' embeddings, row = item_idx
    items.json     {"format": 1, "item_ids": [...]}: item_idx -> external item_id
    popular.json   {"item_ids": [...], "counts": [...]}: training popularity, most first
    manifest.json  format and model version, creation time, hyperparameters, T, d,
                   alpha, padding index, item count, metrics, index parameters and
                   the sha256 and size of every other file

It is written to a temporary sibling directory and renamed into place, so a
service watching the parent never sees a half-written bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.mqsa import MQSA
from training.errors import DataError
from training.trainer import file_sha256
from training.vocabulary import Vocabulary

BUNDLE_FORMAT = 1
ONNX_OPSET = 18
INDEX_TYPES = ("flat", "ivf", "hnsw")


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
            raise ValueError(f"ivf nlist ({nlist}) must not exceed the item count ({n})")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    else:
        raise ValueError(f"index must be one of {INDEX_TYPES}, got {kind!r}")
    index.add(embeddings)
    return index


def index_params(
    kind: str, num_items: int, nlist: int | None, nprobe: int, m: int, ef: int
) -> dict[str, int]:
    """The parameters recorded in the manifest for an index kind."""
    if kind == "ivf":
        return {"nlist": nlist or max(1, int(4 * num_items**0.5)), "nprobe": nprobe}
    if kind == "hnsw":
        return {"m": m, "ef_construction": max(2 * ef, 200), "ef_search": ef}
    return {}


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    popular_top: int = 1000,
    force: bool = False,
) -> dict[str, Any]:
    """Write a serving bundle for a checkpoint; returns its manifest.

    Raises:
        DataError: the checkpoint is missing or lacks the vocabulary, or
            ``out_dir`` exists and ``force`` is not set.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise DataError("no such checkpoint", checkpoint)
    if out_dir.exists() and not force:
        raise DataError("the bundle directory exists (use --force to replace it)", out_dir)
    if index not in INDEX_TYPES:
        raise ValueError(f"index must be one of {INDEX_TYPES}, got {index!r}")
    started = time.perf_counter()
    model, ckpt = MQSA.from_checkpoint(str(checkpoint))
    cfg = model.config
    item_ids = ckpt.get("item_ids")
    counts = np.asarray(ckpt.get("item_counts", []), dtype=np.int64)
    if item_ids is None or len(item_ids) != cfg.num_items or len(counts) != cfg.num_items:
        raise DataError("the checkpoint has no item vocabulary or counts of the right size", checkpoint)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        import faiss

        export_onnx(model, tmp / "encoder.onnx")
        embeddings = np.ascontiguousarray(model.item_embeddings().detach().cpu().numpy(), dtype=np.float32)
        params = index_params(index, cfg.num_items, nlist, nprobe, hnsw_m, ef_search)
        faiss.write_index(build_index(embeddings, index, params), str(tmp / "items.faiss"))
        Vocabulary(item_ids).save(tmp / "items.json")  # the format `mqsa data prepare` writes
        order = np.lexsort((np.arange(cfg.num_items), -counts))  # most popular first, ties by index
        order = order[counts[order] > 0][:popular_top]
        _write_json(
            tmp / "popular.json",
            {"item_ids": [item_ids[i] for i in order], "counts": counts[order].tolist()},
        )
        files = {
            name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in ("encoder.onnx", "items.faiss", "items.json", "popular.json")
        }
        version = hashlib.sha256("".join(f["sha256"] for f in files.values()).encode()).hexdigest()[:16]
        manifest = {
            "format_version": BUNDLE_FORMAT,
            "model_version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "max_len": cfg.max_len,
            "hidden_size": cfg.hidden_size,
            "alpha": float(model.alpha.detach()),
            "padding_idx": cfg.padding_idx,
            "num_items": cfg.num_items,
            "model_config": cfg.to_dict(),
            "train_config": ckpt.get("train_config", {}),
            "metrics": {"epoch": ckpt.get("epoch"), **ckpt.get("metrics", {})},
            "data": ckpt.get("data", {}),
            "encoder": {"opset": ONNX_OPSET, "input": "item_idx", "outputs": ["short", "long"]},
            "index": {"type": index, "metric": "inner_product", **params},
            "files": files,
        }
        _write_json(tmp / "manifest.json", manifest)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["export_seconds"] = time.perf_counter() - started
    return manifest


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing bundle is swapped out, then removed."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
