"""legacy: detection, weights-only loading (numpy 1.x pickles, hostile pickles), conversion state."""

from __future__ import annotations

import ast
import json
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


# ----------------------------------------------------------------------------- folders of several checkpoints

def test_find_root_and_where_converted_steps_go(tmp_path):
    out = tmp_path / "out"
    F.hf_checkpoint(out, 10)
    F.hf_checkpoint(out, 20)
    (out / "model.safetensors").write_bytes((out / "checkpoint-20" / "model.safetensors").read_bytes())
    (out / "config.json").write_text("{}")
    root = legacy.find_root(out)
    assert root.layout == legacy.HF_OUTPUT and [p.name for p in root.entries] == ["checkpoint-10", "checkpoint-20"]
    assert any("final model" in n for n in root.notes) and legacy.detect(out) is not None
    assert legacy.root_of(out / "checkpoint-10").path == out
    assert legacy.default_dest(root.home) == tmp_path / "out.async_ckpt"

    proj = tmp_path / "proj"
    F.accelerate_project(proj, steps=(3, 6))
    for path in (proj, proj / "checkpoints"):
        r = legacy.find_root(path)
        assert r.layout == legacy.ACCELERATE_PROJECT and r.home == proj, path
        assert [r.name_of(p) for p in r.entries][-1].endswith("checkpoint_1")
    assert legacy.root_of(proj / "checkpoints" / "checkpoint_0").home == proj

    pl = tmp_path / "pl"
    F.lightning_file(pl / "a.ckpt", step=2)
    (pl / "link.ckpt").symlink_to(pl / "a.ckpt")          # links are never followed nor counted
    r = legacy.find_root(pl)
    assert r.layout == legacy.LIGHTNING_DIR and [p.name for p in r.entries] == ["a.ckpt"]
    assert legacy.find_root(tmp_path / "pl" / "a.ckpt") is None and legacy.find_root(tmp_path / "nope") is None

    entries, listed = root.entries, root.listed
    assert legacy.dest_problem(tmp_path / "out.async_ckpt", entries, listed, out) is None
    assert legacy.dest_problem(out / "async_ckpt", entries, listed, out) is None
    for bad in (out, out / "checkpoint-10", out / "checkpoint-10" / "x", out / "checkpoint-99", proj):
        assert legacy.dest_problem(bad, entries, listed, out) is not None, bad
    acc = legacy.find_root(proj)
    assert legacy.dest_problem(proj / "checkpoints" / "mine", acc.entries, acc.listed, proj) is not None
    assert legacy.dest_problem(proj / "converted", acc.entries, acc.listed, proj) is None


def test_steps_come_from_the_tools_records(tmp_path):
    hf = F.hf_checkpoint(tmp_path / "hf", 30)["path"]
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 31, "log_history": []}))
    found = legacy.detect(hf)
    assert found.step == 30 and not legacy.check(found)
    assert (found.step, found.step_source) == (31, "trainer_state.json global_step (the folder name says 30)")

    acc = F.accelerate_folder(tmp_path / "acc" / "checkpoint_1", steps=16)["path"]
    found = legacy.detect(acc)
    legacy.check(found)
    assert (found.step, found.step_source) == (16, "scheduler.bin last_epoch (the scheduler's position)")
    (acc / "scheduler.bin").unlink()
    states = legacy.safe_torch_load(acc / "random_states_0.pkl")
    torch.save({**states, "step": 12}, acc / "random_states_0.pkl")
    found = legacy.detect(acc)
    legacy.check(found)
    assert (found.step, found.step_source) == (12, "random_states_0.pkl step (accelerator.step)")
    torch.save({**states, "step": 0}, acc / "random_states_0.pkl")
    found = legacy.detect(acc)
    legacy.check(found)
    assert found.step == 1 and "save counter, not a training step" in found.step_source

    model, opt, sched = F.trained(steps=5)
    cases = {"epoch_only.pt": ({"model": model.state_dict(), "epoch": 3}, 3, "['epoch'] (no step recorded"),
             "sched.pt": ({"model": model.state_dict(), "scheduler": sched.state_dict(), "epoch": 1}, 5,
                          "['scheduler'] last_epoch"),
             "run_7.pt": ({"model": model.state_dict()}, 7, "the file name"),
             "bare.pt": ({"model": model.state_dict()}, 0, "no step recorded anywhere")}
    for name, (obj, step, source) in cases.items():
        torch.save(obj, tmp_path / name)
        found = legacy.detect(tmp_path / name)
        assert not legacy.check(found)
        assert found.step == step and source in found.step_source, (name, found.step, found.step_source)


def test_lightning_items(tmp_path):
    pl = F.lightning_file(tmp_path / "x.ckpt", step=6, epoch=1)
    conv = legacy.load_state(legacy.detect(pl["path"]), seed=0)
    assert conv.step == 6 and conv.step_source == "x.ckpt['global_step']"
    assert conv.state["optimizer"]["param_groups"] == pl["optimizer"].state_dict()["param_groups"]
    assert conv.state["scheduler"] == pl["scheduler"].state_dict()
    assert conv.state["progress"] == {"step": 6, "global_step": 6, "epoch": 1}
    assert "loops" in conv.state["lightning"] and "state_dict" not in conv.state["lightning"]
    assert not conv.item_meta["progress"].reconstructed and conv.item_meta["rng"].reconstructed

    two = legacy.safe_torch_load(pl["path"])
    two["optimizer_states"] = two["optimizer_states"] * 2
    two["lr_schedulers"] = []                       # Lightning writes an empty list without a scheduler
    torch.save(two, tmp_path / "two.ckpt")
    found = legacy.detect(tmp_path / "two.ckpt")
    legacy.check(found)
    assert "scheduler" not in found.components and found.components["optimizer"] == ["optimizer_states"]
    conv = legacy.load_state(found, seed=0)
    assert isinstance(conv.state["optimizer"], list) and len(conv.state["optimizer"]) == 2
    assert "scheduler" not in conv.state
