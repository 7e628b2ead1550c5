"""Load and verify a serving bundle with numpy, onnxruntime and FAISS only (never torch).

The bundle format is written by ``training/export.py`` (see its docstring);
this module is the reading side of that contract. A bundle is refused, with a
message naming the problem, when its manifest is missing or unreadable, its
format version is unknown, a file is missing, or a checksum does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mqsa.errors import BundleError, InferenceError

SUPPORTED_FORMATS = (1,)
# Intentional copies of the writing side's (mqsa.training.export), which the service never
# imports; tests/service/test_boundary_copies.py checks they agree.
BUNDLE_FILES = ("encoder.onnx", "items.faiss", "items.json", "popular.json")
MANIFEST_KEYS = (
    "format_version",
    "model_version",
    "max_len",
    "hidden_size",
    "alpha",
    "padding_idx",
    "num_items",
)


def _sha256(path: Path) -> str:
    """An intentional copy of ``mqsa.training.artifacts.file_sha256`` (checked by a test)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read JSON ({exc})") from exc


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle directory against its manifest; returns the manifest.

    Raises:
        BundleError: naming the bundle and the problem.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: manifest.json is missing")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMATS:
        raise BundleError(
            f"{manifest_path}: unknown bundle format version {version!r} "
            f"(this service reads {SUPPORTED_FORMATS})"
        )
    missing_keys = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing_keys:
        raise BundleError(f"{manifest_path}: missing keys {missing_keys}")
    files = manifest.get("files", {})
    for name in BUNDLE_FILES:
        if name not in files:
            raise BundleError(f"{manifest_path}: no checksum listed for {name}")
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"{path}: {name} is missing")
        if _sha256(file_path) != files[name]["sha256"]:
            raise BundleError(
                f"{path}: {name} does not match its sha256 in the manifest (corrupted or edited)"
            )
    return manifest


@dataclass
class Bundle:
    """A verified, loaded bundle: encoder session, item index, vocabulary, popular items.

    Attributes:
        path: the bundle directory.
        manifest: manifest.json.
        item_ids: item_idx -> external item_id.
        item_index: external item_id -> item_idx.
        popular: external item ids, most popular first.
    """

    path: Path
    manifest: dict[str, Any]
    encoder: Any
    index: Any
    item_ids: list[str]
    item_index: dict[str, int] = field(repr=False)
    popular: list[str] = field(repr=False)

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def alpha(self) -> float:
        return float(self.manifest["alpha"])

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def padding_idx(self) -> int:
        return int(self.manifest["padding_idx"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    def encode(self, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, seq) int64 left-padded, seq <= max_len -> short (B, d), long (B, d) float32."""
        try:
            short, long = self.encoder.run(["short", "long"], {"item_idx": item_idx})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"encoder failed: {exc}") from exc
        return short, long

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product: (B, d) -> scores (B, k), item_idx (B, k) (-1 = none)."""
        try:
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        except Exception as exc:  # FAISS raises RuntimeError from C++
            raise InferenceError(f"index search failed: {exc}") from exc


def load_bundle(path: str | Path, onnx_threads: int = 1, faiss_threads: int = 1) -> Bundle:
    """Verify and load a bundle.

    Args:
        path: the bundle directory.
        onnx_threads: onnxruntime intra- and inter-op threads.
        faiss_threads: OpenMP threads FAISS may use (process-wide).

    Raises:
        BundleError: the bundle fails verification or cannot be loaded.
    """
    import faiss
    import onnxruntime as ort

    path = Path(path)
    manifest = verify_bundle(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = onnx_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        encoder = ort.InferenceSession(
            str(path / "encoder.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise BundleError(f"{path}: encoder.onnx cannot be loaded ({exc})") from exc
    try:
        faiss.omp_set_num_threads(faiss_threads)
        index = faiss.read_index(str(path / "items.faiss"))
    except Exception as exc:
        raise BundleError(f"{path}: items.faiss cannot be loaded ({exc})") from exc
    if "nprobe" in manifest["index"]:
        index.nprobe = int(manifest["index"]["nprobe"])
    if "ef_search" in manifest["index"]:
        index.hnsw.efSearch = int(manifest["index"]["ef_search"])
    item_ids = _read_json(path / "items.json").get("item_ids", [])
    popular = _read_json(path / "popular.json").get("item_ids", [])
    if len(item_ids) != manifest["num_items"] or index.ntotal != manifest["num_items"]:
        raise BundleError(
            f"{path}: item count mismatch: manifest {manifest['num_items']}, "
            f"items.json {len(item_ids)}, index {index.ntotal}"
        )
    return Bundle(
        path=path,
        manifest=manifest,
        encoder=encoder,
        index=index,
        item_ids=item_ids,
        item_index={item_id: i for i, item_id in enumerate(item_ids)},
        popular=popular,
    )
