from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqsa.errors import BundleError
from mqsa.service.bundle import load_bundle, verify_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    """A private copy of the session's bundle to damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_a_good_bundle_loads(bundle_dir) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.num_items == len(bundle.item_ids) == bundle.index.ntotal == 200
    assert bundle.item_index[bundle.item_ids[17]] == 17
    assert bundle.popular and bundle.popular[0] in bundle.item_index
    assert bundle.model_version == json.loads((bundle_dir / "manifest.json").read_text())["model_version"]


@pytest.mark.parametrize("name", ["encoder.onnx", "items.faiss", "items.json", "popular.json"])
def test_a_changed_byte_is_refused(copy, name) -> None:
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name} does not match its sha256"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["encoder.onnx", "items.faiss", "items.json", "popular.json"])
def test_a_missing_file_is_refused(copy, name) -> None:
    (copy / name).unlink()
    with pytest.raises(BundleError, match=rf"{name} is missing"):
        verify_bundle(copy)


def test_unknown_format_version_is_refused(copy) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        verify_bundle(copy)


def test_missing_or_broken_manifest(copy, tmp_path) -> None:
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read JSON"):
        verify_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        verify_bundle(copy)
    with pytest.raises(BundleError, match="no such bundle directory"):
        verify_bundle(tmp_path / "nowhere")


def test_service_never_imports_torch_models_or_training() -> None:
    """Every module of the service (and the errors it shares) imported: none pulls the trainer in."""
    code = (
        "import importlib, pkgutil, sys, mqsa.errors, mqsa.service as s\n"
        "names = [m.name for m in pkgutil.iter_modules(s.__path__, 'mqsa.service.')]\n"
        "assert len(names) >= 10, names\n"
        "for name in names: importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'mqsa.models', 'mqsa.training') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
