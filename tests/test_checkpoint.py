"""Self-describing checkpoints: round trips, resume state, export, and every way to fail."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cascade import __version__
from cascade.errors import CheckpointError
from cascade.models import checkpoint as ckpt_mod
from cascade.models import get_model
from cascade.models.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    checkpoint_sha256,
    describe_checkpoint,
    export_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

PREPROCESSING = {
    "pixel_spacing_mm": 0.07,
    "intensity": "linear [0,1]",
    "quantize_8bit": True,
    "patch_size": 112,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _trained_unet(width: int = 4) -> nn.Module:
    """A small ASN whose BN running statistics moved away from their initial values."""
    model = get_model("asn_unet", width=width)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 1, 32, 32) * 3)
    return model


def _save(path: Path, model: nn.Module, **overrides: Any) -> Path:
    kwargs: dict[str, Any] = {
        "model_name": model.model_name,
        "model_config": model.model_config,
        "state_dict": model.state_dict(),
        "preprocessing": PREPROCESSING,
        "training": {"loss": "ttest", "beta": 0.8, "optimizer": "adam", "lr": 1e-3},
        "data": {"source": "phantom", "n_images": 60, "seed": 1},
        "metrics": {"R@5": 0.55, "R@10": 0.61},
        "kind": "asn",
    }
    kwargs.update(overrides)
    return save_checkpoint(path, **kwargs)


def _rewrite(path: Path, change: Any) -> None:
    """Load the raw checkpoint dict, let ``change`` edit it, save it back."""
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = _trained_unet()
    path = _save(tmp_path / "asn.pt", model)
    loaded = load_checkpoint(path, kind="asn")
    assert isinstance(loaded, Checkpoint)
    assert not loaded.model.training
    model.eval()
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_meta_describes_model_preprocessing_and_versions(tmp_path: Path) -> None:
    model = _trained_unet()
    loaded = load_checkpoint(_save(tmp_path / "asn.pt", model))
    meta = loaded.meta
    assert loaded.kind == "asn"
    assert loaded.preprocessing == PREPROCESSING
    assert meta["architecture"] == {"builder": "asn_unet", "config": model.model_config}
    assert meta["metrics"] == {"R@5": 0.55, "R@10": 0.61}
    assert meta["data"]["n_images"] == 60
    assert meta["training"]["loss"] == "ttest"
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["calcnode_version"] == __version__
    assert meta["torch_version"] == torch.__version__
    assert meta["created"].endswith("+00:00")
    assert meta["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert loaded.optimizer_state is None
    assert loaded.progress is None


def test_preset_name_is_kept_and_resolved_to_its_builder(tmp_path: Path) -> None:
    model = get_model("fpr_resnet50_cpu", width=4)
    path = _save(
        tmp_path / "fpr.pt",
        model,
        model_name="fpr_resnet50_cpu",
        model_config={"width": 4},
        kind="fpr",
        preprocessing={"pixel_spacing_mm": 0.07, "crop_size": 56},
    )
    loaded = load_checkpoint(path, kind="fpr")
    assert loaded.meta["model_name"] == "fpr_resnet50_cpu"
    assert loaded.meta["model_config"] == {"width": 4}
    assert loaded.meta["architecture"]["builder"] == "fpr_resnet50"
    assert loaded.meta["architecture"]["config"]["input_size"] == 56
    model.eval()
    x = torch.rand(3, 1, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_optimizer_state_and_progress_survive_for_resume(tmp_path: Path) -> None:
    model = _trained_unet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model(torch.rand(2, 1, 16, 16)).mean().backward()
    opt.step()
    rng = torch.get_rng_state()
    progress = {
        "epoch": 3,
        "iteration": 400,
        "torch_rng": rng,
        "numpy_rng": np.random.default_rng(5).bit_generator.state,
        "python_rng": list(random.getstate()[1]),
    }
    path = _save(tmp_path / "asn.pt", model, optimizer_state=opt.state_dict(), progress=progress)
    loaded = load_checkpoint(path)
    assert loaded.progress is not None and loaded.optimizer_state is not None
    assert loaded.progress["iteration"] == 400
    assert torch.equal(loaded.progress["torch_rng"], rng)
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.progress["numpy_rng"]
    assert restored.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)

    opt2 = torch.optim.Adam(loaded.model.parameters(), lr=1e-3, weight_decay=1e-4)
    opt2.load_state_dict(loaded.optimizer_state)
    first = next(iter(opt.state.values()))
    first2 = next(iter(opt2.state.values()))
    assert torch.equal(first["exp_avg"], first2["exp_avg"])
    assert opt2.param_groups[0]["weight_decay"] == 1e-4


def test_numpy_scalars_in_meta_become_python_numbers(tmp_path: Path) -> None:
    model = _trained_unet()
    path = _save(tmp_path / "a.pt", model, metrics={"R@5": np.float64(0.5), "n": np.int64(7)})
    metrics = load_checkpoint(path).meta["metrics"]
    assert metrics == {"R@5": 0.5, "n": 7}
    assert type(metrics["R@5"]) is float
    assert type(metrics["n"]) is int


def test_save_rejects_non_plain_metadata_and_says_where(tmp_path: Path) -> None:
    model = _trained_unet()
    with pytest.raises(TypeError, match=r"preprocessing\['root'\] is a PosixPath"):
        _save(tmp_path / "a.pt", model, preprocessing={"root": Path("/data")})
    with pytest.raises(TypeError, match=r"metrics\['curve'\] is a tensor"):
        _save(tmp_path / "a.pt", model, metrics={"curve": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"training has a key 1"):
        _save(tmp_path / "a.pt", model, training={1: "x"})
    with pytest.raises(TypeError, match="data must be a mapping"):
        _save(tmp_path / "a.pt", model, data=["phantom"])
    with pytest.raises(TypeError, match=r"progress\['np_state'\]\[1\] is a ndarray"):
        _save(tmp_path / "a.pt", model, progress={"np_state": np.random.get_state()})
    assert not (tmp_path / "a.pt").exists()


def test_save_rejects_unknown_kind_model_and_config(tmp_path: Path) -> None:
    model = _trained_unet()
    with pytest.raises(ValueError, match="kind"):
        _save(tmp_path / "a.pt", model, kind="segmenter")
    with pytest.raises(ValueError, match="unknown model 'vgg16'"):
        _save(tmp_path / "a.pt", model, model_name="vgg16")
    with pytest.raises(TypeError, match="'channels'"):
        _save(tmp_path / "a.pt", model, model_config={"channels": 4})


def test_save_rejects_a_state_dict_that_does_not_fit_the_architecture(tmp_path: Path) -> None:
    model = _trained_unet(width=4)
    other = get_model("asn_unet", width=8)
    with pytest.raises(ValueError, match="shape mismatch"):
        _save(tmp_path / "a.pt", model, state_dict=other.state_dict())
    partial = dict(model.state_dict())
    partial.pop("out.bias")
    with pytest.raises(ValueError, match=r"missing \['out.bias'\]"):
        _save(tmp_path / "a.pt", model, state_dict=partial)
    with pytest.raises(TypeError, match=r"state_dict\['x'\] is a int"):
        _save(tmp_path / "a.pt", model, state_dict={**model.state_dict(), "x": 1})


def test_save_replaces_atomically_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained_unet()
    path = _save(tmp_path / "sub" / "asn.pt", model)
    before = path.read_bytes()

    def broken_save(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, model, metrics={"R@5": 0.9})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["asn.pt"]
    _save(path, model, metrics={"R@5": 0.9})
    assert load_checkpoint(path).meta["metrics"] == {"R@5": 0.9}
    assert sorted(p.name for p in path.parent.iterdir()) == ["asn.pt"]


def test_load_rejects_the_wrong_kind(tmp_path: Path) -> None:
    path = _save(tmp_path / "asn.pt", _trained_unet())
    with pytest.raises(CheckpointError, match="holds a 'asn' model, expected 'fpr'"):
        load_checkpoint(path, kind="fpr")
    with pytest.raises(ValueError, match="kind"):
        load_checkpoint(path, kind="detector")


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint_sha256(tmp_path / "nope.pt")


def test_load_reports_corrupt_and_truncated_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable calcnode checkpoint"):
        load_checkpoint(garbage)
    good = _save(tmp_path / "good.pt", _trained_unet())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable calcnode checkpoint"):
        load_checkpoint(truncated)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "calcnode-checkpoint", "payload": Path("/etc")}, path)
    with pytest.raises(CheckpointError, match="not a readable calcnode checkpoint"):
        load_checkpoint(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)


def test_load_rejects_a_torch_file_that_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(get_model("asn_unet", width=4).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a calcnode checkpoint"):
        load_checkpoint(path)


def test_load_rejects_a_newer_format_version(tmp_path: Path) -> None:
    path = _save(tmp_path / "asn.pt", _trained_unet())
    _rewrite(path, lambda obj: obj.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer"):
        load_checkpoint(path)


def test_load_rejects_an_unknown_architecture(tmp_path: Path) -> None:
    path = _save(tmp_path / "asn.pt", _trained_unet())
    _rewrite(path, lambda obj: obj["meta"]["architecture"].update(builder="transunet"))
    with pytest.raises(CheckpointError, match="cannot rebuild architecture 'transunet'"):
        load_checkpoint(path)
    path2 = _save(tmp_path / "asn2.pt", _trained_unet())
    _rewrite(path2, lambda obj: obj["meta"]["architecture"]["config"].update(dropout=0.1))
    with pytest.raises(CheckpointError, match="'dropout'"):
        load_checkpoint(path2)


def test_load_rejects_mismatched_weights(tmp_path: Path) -> None:
    path = _save(tmp_path / "asn.pt", _trained_unet(width=4))
    _rewrite(path, lambda obj: obj["meta"]["architecture"]["config"].update(width=8))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(path)
    path2 = _save(tmp_path / "asn2.pt", _trained_unet(width=4))
    _rewrite(path2, lambda obj: obj["state_dict"].pop("out.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path2)


def test_load_rejects_a_checkpoint_without_meta_sections(tmp_path: Path) -> None:
    path = _save(tmp_path / "asn.pt", _trained_unet())
    _rewrite(path, lambda obj: obj["meta"].pop("preprocessing"))
    with pytest.raises(CheckpointError, match="no 'preprocessing'"):
        load_checkpoint(path)


def test_sha256_and_description_without_weights(tmp_path: Path) -> None:
    model = _trained_unet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = _save(tmp_path / "asn.pt", model, optimizer_state=opt.state_dict())
    digest = checkpoint_sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    info = describe_checkpoint(path)
    assert info["file"] == {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": digest,
    }
    assert info["kind"] == "asn"
    assert info["has_optimizer_state"] is True
    assert info["has_progress"] is False
    assert "state_dict" not in info
    assert json.loads(json.dumps(info))["preprocessing"] == PREPROCESSING


def test_export_drops_resume_state_and_halves_the_weights(tmp_path: Path) -> None:
    model = _trained_unet(width=8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 16, 16)).mean().backward()
    opt.step()
    src = _save(tmp_path / "asn.pt", model, optimizer_state=opt.state_dict(), progress={"epoch": 1})
    full = export_checkpoint(src, tmp_path / "full.pt")
    half = export_checkpoint(src, tmp_path / "half.pt", half=True, metrics={"R@5": 0.6})
    assert full.stat().st_size < 0.5 * src.stat().st_size  # Adam's two moments dropped
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half, kind="asn")
    assert loaded.optimizer_state is None and loaded.progress is None
    assert loaded.meta["metrics"] == {"R@5": 0.6}
    assert loaded.meta["exported"]["from_sha256"] == checkpoint_sha256(src)
    assert loaded.meta["exported"]["weights_dtype"] == "float16"
    assert next(loaded.model.parameters()).dtype == torch.float32
    model.eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=5e-3, rtol=0)
        torch.testing.assert_close(load_checkpoint(full).model(x), model(x), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_to_gpu_puts_the_model_there(tmp_path: Path) -> None:
    model = _trained_unet()
    loaded = load_checkpoint(_save(tmp_path / "asn.pt", model), map_location="cuda")
    assert next(loaded.model.parameters()).is_cuda
    model.eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x.cuda()).cpu(), model(x), atol=1e-5, rtol=1e-4)
