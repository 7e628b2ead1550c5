"""Load and verify a serving bundle with numpy, onnxruntime and FAISS only (never torch).

The bundle format is written by ``training/export.py`` (see its docstring); this
module is the reading side of that contract. A bundle is refused, with a message
naming the problem (for the log; ``/admin/reload`` answers one message whatever it
is), when:

* the directory or its manifest is missing or unreadable, or of an unknown format;
* the manifest was edited: its digest (sha256 of its canonical JSON without
  ``model_version`` and ``signature``) must begin with ``model_version``;
* a signature key is configured and the manifest's HMAC-SHA256 signature is
  missing or wrong;
* a file is missing or does not match its sha256 in the manifest;
* the manifest disagrees with the files: T, d, the item count and the padding index
  recorded in the encoder's metadata, d and the item count of the index, the length
  of items.json, an alpha outside [0, 1]; and the encoder must run on a full-length
  history (T items) and answer (1, d).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mqsa.errors import BundleError, InferenceError

SUPPORTED_FORMATS = (2,)
# Intentional copies of the writing side's (mqsa.training.export), which the service never
# imports; tests/service/test_boundary_copies.py checks they agree.
BUNDLE_FILES = ("encoder.onnx", "items.faiss", "items.json", "popular.json")
ENCODER_METADATA = ("max_len", "hidden_size", "num_items", "padding_idx")  # mqsa.<name> in the ONNX model
MANIFEST_KEYS = (
    "format_version",
    "model_version",
    "max_len",
    "hidden_size",
    "alpha",
    "padding_idx",
    "num_items",
    "files",
    "index",
)


def _sha256(path: Path) -> str:
    """An intentional copy of ``mqsa.training.artifacts.file_sha256`` (checked by a test)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, ``model_version`` and ``signature`` left out.

    An intentional copy of the exporter's (checked by a test): the model version is its
    first 16 hex digits, so a manifest edited after export no longer matches its version.
    """
    body = {k: v for k, v in manifest.items() if k not in ("model_version", "signature")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_signature(manifest: dict[str, Any], key: str) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of everything but the signature; a copy of the exporter's."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key.encode(), canonical, hashlib.sha256).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read JSON ({exc})") from exc


def verify_bundle(path: str | Path, hmac_key: str | None = None) -> dict[str, Any]:
    """Check a bundle directory against its manifest; returns the manifest.

    Args:
        path: the bundle directory.
        hmac_key: when given, the manifest must carry a valid signature made with it.

    Raises:
        BundleError: naming the bundle and the problem.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        manifest = _read_manifest(path)
        _check_authentic(path, manifest, hmac_key)
        _check_files(path, manifest)
    except OSError as exc:  # a name too long, a permission, a loop of links: not a usable bundle
        raise BundleError(f"{path}: cannot read the bundle ({exc.strerror or exc})") from exc
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: manifest.json is missing")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: not a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMATS:
        raise BundleError(
            f"{manifest_path}: unknown bundle format version {version!r} (this service reads "
            f"{SUPPORTED_FORMATS}; export the checkpoint again with this version's `mqsa export`)"
        )
    missing_keys = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing_keys:
        raise BundleError(f"{manifest_path}: missing keys {missing_keys}")
    return manifest


def _check_authentic(path: Path, manifest: dict[str, Any], hmac_key: str | None) -> None:
    if not manifest_digest(manifest).startswith(str(manifest["model_version"])):
        raise BundleError(
            f"{path}: manifest.json was edited after export (its digest is not its model_version)"
        )
    if hmac_key is None:
        return
    signature = manifest.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature, manifest_signature(manifest, hmac_key)
    ):
        raise BundleError(
            f"{path}: manifest.json has no valid signature for the configured MQSA_BUNDLE_HMAC_KEY"
        )


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    for name in BUNDLE_FILES:
        if not isinstance(files, dict) or name not in files:
            raise BundleError(f"{path}: no checksum listed for {name}")
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"{path}: {name} is missing")
        if _sha256(file_path) != files[name].get("sha256"):
            raise BundleError(
                f"{path}: {name} does not match its sha256 in the manifest (corrupted or edited)"
            )


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

    @property
    def index_type(self) -> str:
        return str(self.manifest["index"].get("type", "flat"))

    def search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product: (B, d) -> scores (B, k), item_idx (B, k) (-1 = none).

        ``params``: FAISS search parameters (an ID selector; see :meth:`search_parameters`).
        """
        try:
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        except Exception as exc:  # FAISS raises RuntimeError from C++
            raise InferenceError(f"index search failed: {exc}") from exc

    def search_parameters(self, selector: Any, share: float) -> Any:
        """FAISS parameters that apply ``selector``; an approximate index searches ``1 / share``
        wider (more IVF lists, a larger HNSW beam), so that a filter leaving few items still
        finds enough of them."""
        import faiss

        widen = 1.0 / max(share, 1e-3)
        params = self.manifest["index"]
        if self.index_type == "ivf":
            nprobe = min(int(params["nlist"]), int(np.ceil(int(params["nprobe"]) * widen)))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if self.index_type == "hnsw":
            return faiss.SearchParametersHNSW(
                sel=selector, efSearch=int(np.ceil(int(params["ef_search"]) * widen))
            )
        return faiss.SearchParameters(sel=selector)

    def item_vector(self, item_idx: int) -> np.ndarray:
        """(1, d) the item's embedding, as stored in the index."""
        try:
            return self.index.reconstruct(int(item_idx)).reshape(1, -1)
        except Exception as exc:  # FAISS raises RuntimeError from C++
            raise InferenceError(f"cannot read item {item_idx} from the index: {exc}") from exc


def load_bundle(
    path: str | Path, onnx_threads: int = 1, faiss_threads: int = 1, hmac_key: str | None = None
) -> Bundle:
    """Verify and load a bundle, and check that the manifest agrees with its files.

    Args:
        path: the bundle directory.
        onnx_threads: onnxruntime intra- and inter-op threads.
        faiss_threads: OpenMP threads FAISS may use (process-wide).
        hmac_key: when given, the manifest must be signed with it.

    A link (``ROOT/current``) is followed once, first: every file is read from the
    version it named then, so a switch during the load cannot mix two versions' files.

    Raises:
        BundleError: the bundle fails verification or cannot be loaded.
    """
    path = _followed(Path(path))
    manifest = verify_bundle(path, hmac_key)
    encoder = _open_encoder(path, onnx_threads)
    index = _open_index(path, manifest, faiss_threads)
    item_ids = _read_json(path / "items.json").get("item_ids", [])
    popular = _read_json(path / "popular.json").get("item_ids", [])
    bundle = Bundle(
        path=path,
        manifest=manifest,
        encoder=encoder,
        index=index,
        item_ids=item_ids,
        item_index={item_id: i for i, item_id in enumerate(item_ids)},
        popular=popular,
    )
    _check_consistent(bundle)
    return bundle


def _followed(path: Path) -> Path:
    """``path`` with every link in it resolved (once)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links, a name too long
        raise BundleError(f"{path}: cannot follow the path ({exc})") from exc


def _open_encoder(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(
            str(path / "encoder.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path}: encoder.onnx cannot be loaded ({exc})") from exc


def _open_index(path: Path, manifest: dict[str, Any], threads: int) -> Any:
    import faiss

    try:
        faiss.omp_set_num_threads(threads)
        index = faiss.read_index(str(path / "items.faiss"))
    except Exception as exc:  # FAISS raises RuntimeError from C++
        raise BundleError(f"{path}: items.faiss cannot be loaded ({exc})") from exc
    params = manifest["index"] if isinstance(manifest["index"], dict) else {}
    if "nprobe" in params:
        index.nprobe = int(params["nprobe"])
        index.make_direct_map()  # so an item's vector can be read back (similar items)
    if "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])
    return index


def _check_consistent(bundle: Bundle) -> None:
    """The manifest's numbers against the encoder's metadata and graph, the index and items.json."""
    m, where = bundle.manifest, bundle.path
    meta = bundle.encoder.get_modelmeta().custom_metadata_map
    for name in ENCODER_METADATA:
        recorded = meta.get(f"mqsa.{name}")
        if recorded is None or str(m[name]) != recorded:
            raise BundleError(
                f"{where}: manifest {name} {m[name]!r} but the encoder was exported with {recorded!r}"
            )
    alpha = m["alpha"]
    if not isinstance(alpha, int | float) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise BundleError(f"{where}: manifest alpha {alpha!r} is not in [0, 1]")
    if m["padding_idx"] != m["num_items"]:
        raise BundleError(
            f"{where}: manifest padding_idx {m['padding_idx']} is not num_items {m['num_items']}"
        )
    counts = {"items.json": len(bundle.item_ids), "index": bundle.index.ntotal}
    if any(n != m["num_items"] for n in counts.values()):
        raise BundleError(f"{where}: item count mismatch: manifest {m['num_items']}, {counts}")
    if bundle.index.d != m["hidden_size"]:
        raise BundleError(
            f"{where}: manifest hidden_size {m['hidden_size']} but the index has d {bundle.index.d}"
        )
    probe = np.zeros((1, int(m["max_len"])), dtype=np.int64)  # a full-length history
    try:
        short, long = bundle.encode(probe)
    except InferenceError as exc:
        raise BundleError(
            f"{where}: the encoder fails on a history of max_len {m['max_len']} ({exc})"
        ) from exc
    if short.shape != (1, m["hidden_size"]) or long.shape != (1, m["hidden_size"]):
        raise BundleError(f"{where}: the encoder answers {short.shape}, not (1, {m['hidden_size']})")


def bundle_under(root: Path, name: str | os.PathLike[str]) -> Path:
    """``name`` (relative to ``root``, or absolute) resolved, if it lies under ``root``.

    Raises:
        BundleError: a name that cannot be a path, or a path outside ``root``.
    """
    try:
        path = (root / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # too long, a loop of links, a NUL byte
        raise BundleError(f"{name!r} is not a usable path ({exc})") from exc
    if not path.is_relative_to(root):
        raise BundleError(f"{path} is outside the bundle root {root}")
    return path
