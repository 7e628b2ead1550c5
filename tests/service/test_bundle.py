from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqsa.errors import BundleError
from mqsa.service.bundle import load_bundle, manifest_digest, verify_bundle

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


def edit_manifest(bundle: Path, reversion: bool = False, **changes: object) -> None:
    """Change manifest fields; with ``reversion``, also recompute its model version (as an attacker could)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    if reversion:
        manifest["model_version"] = manifest_digest(manifest)[:16]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_an_edited_manifest_is_refused(copy) -> None:
    """max_len 20 -> 40 used to be accepted, and every longer request then answered 500 (issue 22, 4)."""
    edit_manifest(copy, max_len=40)
    with pytest.raises(BundleError, match=r"manifest\.json was edited after export"):
        verify_bundle(copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_len": 40}, "manifest max_len 40 but the encoder was exported with '20'"),
        ({"hidden_size": 16}, "manifest hidden_size 16 but the encoder was exported with '32'"),
        ({"num_items": 199}, "manifest num_items 199 but the encoder was exported with '200'"),
        ({"alpha": 1.5}, r"manifest alpha 1\.5 is not in \[0, 1\]"),
        ({"alpha": float("nan")}, r"manifest alpha nan is not in \[0, 1\]"),
    ],
)
def test_a_reversioned_manifest_is_checked_against_its_files(copy, change, message) -> None:
    """Even with its version recomputed, a manifest must agree with the encoder, the index and
    items.json, and hold an alpha in [0, 1]."""
    edit_manifest(copy, reversion=True, **change)
    verify_bundle(copy)  # the digest matches again...
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)  # ...but the files say otherwise


def test_with_a_key_only_signed_bundles_load(trained_run, tmp_path) -> None:
    """An alpha edit inside [0, 1] with a recomputed version cannot be told from the files: the
    HMAC signature catches it."""
    from mqsa.training.export import export_bundle

    signed = tmp_path / "signed"
    export_bundle(trained_run["dir"] / "best.pt", signed, hmac_key="team-secret")
    assert load_bundle(signed, hmac_key="team-secret").model_version
    with pytest.raises(BundleError, match="no valid signature"):
        load_bundle(signed, hmac_key="another-secret")
    tampered = Path(shutil.copytree(signed, tmp_path / "tampered"))
    edit_manifest(tampered, reversion=True, alpha=0.9)
    assert load_bundle(tampered).alpha == 0.9  # without a key, nothing can tell
    with pytest.raises(BundleError, match="no valid signature"):
        load_bundle(tampered, hmac_key="team-secret")
    unsigned = Path(shutil.copytree(signed, tmp_path / "unsigned"))
    edit_manifest(unsigned, reversion=True, signature=None)
    with pytest.raises(BundleError, match="no valid signature"):
        load_bundle(unsigned, hmac_key="team-secret")


def test_an_unreadable_path_is_a_bundle_error_not_an_os_error(tmp_path) -> None:
    with pytest.raises(BundleError, match=r"cannot read the bundle|no such bundle directory"):
        verify_bundle(tmp_path / ("x" * 300))  # ENAMETOOLONG


SERVICE = ROOT / "service"
TRAINER_SIDE = ("torch", "mqsa.models", "mqsa.training", "models", "training")


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_service_module_imports_the_trainer_anywhere() -> None:
    """Read, not run: an import inside a function counts too."""
    files = sorted(SERVICE.rglob("*.py"))
    assert len(files) >= 15
    for path in files:
        bad = {n for n in imported_names(path) if any(n == t or n.startswith(t + ".") for t in TRAINER_SIDE)}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_service_never_imports_torch_models_or_training() -> None:
    """Every module of the service (and the errors it shares) imported: none pulls the trainer in."""
    code = (
        "import importlib, pkgutil, sys, mqsa.errors, mqsa.service as s\n"
        "names = [m.name for m in pkgutil.walk_packages(s.__path__, 'mqsa.service.')]\n"
        "assert len(names) >= 15, names\n"
        "for name in names: importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'mqsa.models', 'mqsa.training') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
