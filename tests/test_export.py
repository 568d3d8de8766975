"""Export: a committed step's model -> model.safetensors / pytorch_model.bin, loaded back bit for bit.

`from_pretrained` must re-tie GPT-2's lm_head to the embedding from the exported file (one
copy stored, as `save_pretrained` stores it), and every byte of every weight must match.
Bad input is a one-line error with exit 2 (64 for usage), never a traceback.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
)

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.integrations.export import main
from async_ckpt.integrations.hf import AsyncCheckpointTrainer, config_files
from bitwise import bits

OPTS = CheckpointManagerOptions(max_to_keep=None, handle_sigterm=False)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), k


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                        bos_token_id=0, eos_token_id=0))
    with torch.no_grad():   # weights that are not what a fresh init would give
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.fixture
def saved(tmp_path):
    model = tiny_gpt2()
    root = tmp_path / "ckpt"
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(root, OPTS) as mgr:
        mgr.save(3, {"model": model, "optimizer": opt, "config": config_files(model)})
        mgr.save(5, {"model": model, "progress": {"step": 5}})            # no config item
        mgr.save(7, {"progress": {"step": 7}})                             # no model item
        mgr.save(9, {"model": {"w": torch.ones(2), "nested": {"x": torch.ones(1)}}})
    return model, root


def test_safetensors_loads_with_from_pretrained_bit_for_bit(saved, tmp_path, capsys):
    model, root = saved
    out = tmp_path / "hf"
    assert main([str(root), "--step", "3", "--format", "safetensors", "--out", str(out)]) == 0
    assert "1 tied alias(es) dropped" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    # The same tensor names save_pretrained writes: the tied lm_head.weight is not stored.
    ref = tmp_path / "ref"
    model.save_pretrained(ref)
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(ref / "model.safetensors", "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert "lm_head.weight" not in f.keys()
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

    loaded = GPT2LMHeadModel.from_pretrained(out)
    assert_same_weights(model, loaded)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()   # re-tied


def test_tied_model_restores_into_a_model_built_from_its_config(saved):
    """Outside the Trainer: from_config ties lm_head to the embedding; the checkpoint holds
    both names as one array, so restore fills the tied pair in place and keeps it tied."""
    model, root = saved
    with CheckpointManager(root, OPTS) as mgr:
        box = {"config": {}}
        mgr.restore(box, step=3, restore_rng=False)
        fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(box["config"]["config.json"])))
        mgr.restore({"model": fresh}, step=3, restore_rng=False)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    assert_same_weights(model, fresh)


def test_torch_format_is_a_plain_state_dict(saved, tmp_path):
    model, root = saved
    out = tmp_path / "pt"
    assert main([str(root), "--step", "3", "--format", "torch", "--out", str(out)]) == 0
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(sd) == list(model.state_dict())            # every name, tied ones included
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    fresh = tiny_gpt2(seed=1)
    fresh.load_state_dict(sd, strict=True)
    assert_same_weights(model, fresh)


def test_latest_step_without_config(saved, tmp_path):
    model, root = saved
    # step 9 (latest) is not a flat state dict; step 5 has a model and no config.
    out = tmp_path / "five"
    assert main([str(root), "--step", "5", "--format", "safetensors", "--out", str(out)]) == 0
    assert os.listdir(out) == ["model.safetensors"]
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, value in model.state_dict().items():
            if name != "lm_head.weight":      # no config: the first name of a tied group stays
                assert torch.equal(bits(f.get_tensor(name)), bits(value)), name


@pytest.mark.parametrize("args, code, message", [
    (["--format", "safetensors", "--out", "{out}"], 64, "required: root"),
    (["{root}", "--format", "onnx", "--out", "{out}"], 64, "invalid choice"),
    (["{root}", "--step", "x", "--format", "torch", "--out", "{out}"], 64, "invalid int"),
    (["{tmp}/nowhere", "--format", "torch", "--out", "{out}"], 2, "no such checkpoint root"),
    (["{root}", "--step", "4", "--format", "torch", "--out", "{out}"], 2, "step 4 is not a committed step"),
    (["{root}", "--step", "7", "--format", "torch", "--out", "{out}"], 2, "has no item(s) ['model']"),
    (["{root}", "--format", "torch", "--out", "{out}"], 2, "'nested' holds a dict"),
    (["{root}", "--step", "3", "--format", "torch", "--out", "{root}"], 64, "not an empty folder"),
])
def test_bad_input_is_one_line_and_an_exit_code(saved, tmp_path, capsys, args, code, message):
    _, root = saved
    fill = {"root": str(root), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in args]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_and_busy_root(saved, tmp_path):
    _, root = saved
    cmd = [sys.executable, "-m", "async_ckpt.integrations.export", str(root), "--step", "3",
           "--format", "torch", "--out", str(tmp_path / "cli")]
    with CheckpointManager(root, OPTS):     # a training run still holds the root
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "Traceback" not in busy.stderr, busy.stderr
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "pytorch_model.bin").is_file()


def test_export_of_a_trainer_checkpoint(tmp_path):
    """End to end: AsyncCheckpointTrainer saves, export writes a from_pretrained folder."""
    model = tiny_gpt2()
    data = [{"input_ids": torch.arange(i, i + 16) % 64, "labels": torch.arange(i, i + 16) % 64}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = AsyncCheckpointTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "export"
    assert main([str(trainer.checkpoint_dir), "--format", "safetensors", "--out", str(out)]) == 0
    assert_same_weights(trainer.model, GPT2LMHeadModel.from_pretrained(out))
