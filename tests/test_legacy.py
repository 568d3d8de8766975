"""legacy: detection, weights-only loading (numpy 1.x pickles, hostile pickles), conversion state."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from async_ckpt.tools import legacy

import fixtures_legacy as F


def test_module_never_imports_pickle():
    tree = ast.parse(Path(legacy.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"pickle", "_pickle", "dill", "cloudpickle"} & imported


def test_numpy1_rng_file_loads(tmp_path):
    st = F.hf_rng_state(3)
    F.numpy1_torch_save(st, tmp_path / "rng_state.pth")
    import zipfile
    with zipfile.ZipFile(tmp_path / "rng_state.pth") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray" in pkl and b"numpy._core" not in pkl
    with pytest.raises(Exception):   # torch alone refuses it
        torch.load(tmp_path / "rng_state.pth", weights_only=True)
    got = legacy.safe_torch_load(tmp_path / "rng_state.pth")
    assert got["python"] == st["python"]
    assert got["numpy"][0] == "MT19937" and np.array_equal(got["numpy"][1], st["numpy"][1])
    assert torch.equal(got["cpu"], st["cpu"])


@pytest.mark.parametrize("zip_format", [True, False])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    sentinel = tmp_path / "pwned"
    F.malicious_torch_file(tmp_path / "x.pt", sentinel, zip_format=zip_format)
    with pytest.raises(legacy.UnsafeFileError, match="not loadable as weights only"):
        legacy.safe_torch_load(tmp_path / "x.pt")
    with pytest.raises(legacy.UnsafeFileError):
        legacy.check_torch_file(tmp_path / "x.pt", quick=False)
    assert not sentinel.exists()


def test_detect_layouts(tmp_path):
    hf = F.hf_checkpoint(tmp_path / "hf", 30, weights="sharded", sentinel=tmp_path / "never")
    found = legacy.detect(hf["path"])
    assert found.layout == legacy.HF_TRAINER and found.step == 30
    assert "model.safetensors.index.json" in found.components["model"]
    assert len([n for n in found.components["model"] if n.endswith(".safetensors")]) == 2
    assert found.components["rng"] == ["rng_state.pth"] and found.skipped == ["training_args.bin"]
    acc = F.accelerate_folder(tmp_path / "acc" / "checkpoint_2")
    found = legacy.detect(acc["path"])
    assert found.layout == legacy.ACCELERATE and found.step == 2
    assert found.components["rng"] == ["random_states_0.pkl"]
    F.torch_file(tmp_path / "model_40.pt")
    assert legacy.detect(tmp_path / "model_40.pt").layout == legacy.TORCH_FILE
    assert legacy.detect(tmp_path / "acc") is None
    (tmp_path / "notes.txt").write_text("hi")
    assert legacy.detect(tmp_path / "notes.txt") is None
    assert not (tmp_path / "never").exists()


def test_missing_shard_reported(tmp_path):
    hf = F.hf_checkpoint(tmp_path, 1, weights="sharded")
    next(hf["path"].glob("model-00002-*.safetensors")).unlink()
    found = legacy.detect(hf["path"])
    problems = legacy.check(found)
    assert any("missing" in p.message for p in problems)


def test_load_state_hf(tmp_path):
    hf = F.hf_checkpoint(tmp_path, 50)
    conv = legacy.load_state(legacy.detect(hf["path"]), seed=1)
    assert conv.step == 50
    assert set(conv.state) >= {"model", "optimizer", "scheduler", "scaler", "progress", "rng", "config",
                               "tokenizer"}
    assert {k: v.kind for k, v in conv.item_meta.items()}["tokenizer"] == "tokenizer"
    for k, v in hf["model"].state_dict().items():
        assert torch.equal(conv.state["model"][k], v)
    p = conv.state["progress"]
    assert p["step"] == 50 and p["epoch"] == 1.5 and p["loss_history"] == [[10, 2.5], [20, 1.75]]
    assert conv.state["tokenizer"]["tokenizer.model"] == bytes(range(256))
    assert isinstance(conv.state["config"]["config.json"], str)
    r = conv.state["rng"]
    assert r["python"] == hf["rng"]["python"] and torch.equal(r["torch"], hf["rng"]["cpu"]) and r["cuda"] == []
    assert not conv.item_meta["rng"].reconstructed


def test_load_state_without_rng_is_deterministic_and_marked(tmp_path):
    a = F.hf_checkpoint(tmp_path / "a", 9, rng=None, trainer_state=False)
    c1 = legacy.load_state(legacy.detect(a["path"]), seed=5)
    c2 = legacy.load_state(legacy.detect(a["path"]), seed=5)
    c3 = legacy.load_state(legacy.detect(a["path"]), seed=6)
    assert c1.item_meta["rng"].reconstructed and c1.item_meta["progress"].reconstructed
    assert c1.state["rng"]["python"] == c2.state["rng"]["python"]
    assert torch.equal(c1.state["rng"]["torch"], c2.state["rng"]["torch"])
    assert c1.state["rng"]["python"] != c3.state["rng"]["python"]
    assert c1.state["progress"] == {"step": 9}
    assert any("derived from seed 5" in n for n in c1.notes)
