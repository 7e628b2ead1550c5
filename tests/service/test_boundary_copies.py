"""The service never imports the trainer, so a few small pieces exist twice, on purpose (the
bundle format's reading side mirrors its writing side):
each copy is marked in its docstring, and here each pair is checked to agree."""

from __future__ import annotations

import numpy as np
import torch

from mqsa.models.mqsa import MQSA, MQSAConfig
from mqsa.service import bundle, retrieval
from mqsa.training import artifacts, export, sequences


def test_left_pad_agrees_with_the_trainers() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        histories = [
            rng.integers(0, 30, size=rng.integers(0, 12)).tolist() for _ in range(rng.integers(1, 6))
        ]
        max_len = int(rng.integers(1, 10))
        served = retrieval.left_pad(histories, max_len, padding_idx=30)
        width = served.shape[1]  # the service pads to the longest history (at most max_len)
        assert width == max(1, min(max_len, max(len(h) for h in histories)))
        trained = sequences.left_pad([np.array(h, dtype=np.int64) for h in histories], width, padding_idx=30)
        np.testing.assert_array_equal(served, trained)


def test_blend_agrees_with_the_models() -> None:
    for alpha in (0.0, 0.3, 0.5, 1.0):
        model = MQSA(MQSAConfig(num_items=5, hidden_size=8, alpha=alpha))
        g = torch.Generator().manual_seed(1)
        short, long = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        expected = model.blend(short, long).numpy()
        np.testing.assert_allclose(
            retrieval.blend(short.numpy(), long.numpy(), alpha), expected, rtol=0, atol=1e-7
        )


def test_sha256_agrees_with_the_exporters(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(2).bytes(3 * (1 << 20) + 17))  # more than one 1 MiB block
    assert bundle._sha256(path) == artifacts.file_sha256(path)


def test_bundle_files_agree_with_the_exporters() -> None:
    assert bundle.BUNDLE_FILES == export.BUNDLE_FILES


def test_the_format_and_the_manifest_keys_agree_with_the_exporters(bundle_dir) -> None:
    import json

    assert export.BUNDLE_FORMAT in bundle.SUPPORTED_FORMATS
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(bundle.MANIFEST_KEYS) <= set(manifest)
    session = bundle.load_bundle(bundle_dir).encoder.get_modelmeta().custom_metadata_map
    assert {f"mqsa.{name}" for name in bundle.ENCODER_METADATA} <= set(session)


def test_the_manifest_digest_and_signature_agree_with_the_exporters(bundle_dir) -> None:
    import json

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert bundle.manifest_digest(manifest) == export.manifest_digest(manifest)
    edited = {**manifest, "alpha": 0.25, "signature": "x"}
    assert (
        bundle.manifest_digest(edited) == export.manifest_digest(edited) != export.manifest_digest(manifest)
    )
    for key in ("k", "another key"):
        assert bundle.manifest_signature(edited, key) == export.manifest_signature(edited, key)


def test_the_versions_json_writer_agrees_with_the_trainers(tmp_path) -> None:
    """service/versions.py keeps its own atomic JSON writer (with an fsync): same content."""
    from mqsa.service import versions

    payload = {"versions": [{"version": "abc", "at": "2026-11-30T00:00:00+00:00"}], "note": "ü"}
    artifacts.write_json_atomic(tmp_path / "trainer.json", payload, indent=1)
    versions.write_json_atomic(tmp_path / "service.json", payload)
    assert (tmp_path / "service.json").read_bytes() == (tmp_path / "trainer.json").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_archive_schema_agrees_with_the_archivers() -> None:
    from mqsa.service.archive import SCHEMA
    from mqsa.training.prepare import archive_schema

    read = archive_schema()
    assert read.names == [*SCHEMA.names, "date"]
    assert [str(f.type) for f in read][:-1] == [str(f.type) for f in SCHEMA]
