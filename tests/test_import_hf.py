"""Hugging Face Trainer folders through ``python -m async_ckpt.fix``, with the real Trainer.

A tiny GPT-2 (tied ``lm_head``, dropout, warmup, weight decay: the Trainer's two parameter
groups) trains 6 steps, saving ``checkpoint-3`` and ``checkpoint-6``, then ``save_model``
writes the final model at the top of the output dir. ``fix --dry-run`` must leave the
whole tree byte-identical; ``fix`` converts both checkpoints into ``out.async_ckpt``
without touching ``out``; the Trainer still resumes from its own ``checkpoint-3`` (bit for
bit, as it does without us); the converted step restores into a fresh ``from_config``
model and the optimizer and scheduler the Trainer builds, bitwise equal to the Trainer's
files, with the README's lines; ``AsyncCheckpointTrainer`` resumes from the converted
step bit for bit too.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from async_ckpt import CheckpointManager, RestoreError
from async_ckpt.integrations.hf import AsyncCheckpointTrainer
from async_ckpt.tools import fix, legacy, verify

import fixtures_legacy as F
from test_verify import run_cli

VOCAB, SEQ = 64, 12


class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (24, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def config(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                      eos_token_id=0, **kw)


def run_args(out) -> TrainingArguments:
    return TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=4, save_steps=3,
                             learning_rate=1e-3, warmup_steps=2, weight_decay=0.1, seed=7, use_cpu=True,
                             report_to=[], disable_tqdm=True, logging_strategy="no")


def make(out, cls=Trainer, **kw):
    torch.manual_seed(0)
    return cls(model=GPT2LMHeadModel(config()), args=run_args(out), train_dataset=Data(), **kw)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    out = base / "out"
    trainer = make(out)
    trainer.train()
    trainer.save_model()
    return {"base": base, "out": out, "final": params(trainer.model)}


def test_dry_run_then_fix_leave_the_trainer_folder_as_it_was(run):
    out, dest = run["out"], run["base"] / "out.async_ckpt"
    before, source = F.tree_fingerprint(run["base"]), F.tree_fingerprint(out)
    assert fix.main(["--dry-run", str(out)]) == 0
    assert F.tree_fingerprint(run["base"]) == before              # nothing written, not even a lock
    rep = verify.check_path(out)
    assert isinstance(rep, verify.RootReport) and [r.step for r in rep.steps] == [6, 3]
    assert all(r.verdict == verify.COMPLETE for r in rep.steps)
    assert any("final model (save_model)" in n for n in rep.notes)

    r = run_cli("async_ckpt.fix", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"converted steps go to: {dest}" in r.stdout
    assert "step 3 (from trainer_state.json global_step)" in r.stdout
    assert "lm_head.weight = transformer.wte.weight" in r.stdout
    assert F.tree_fingerprint(out) == source                        # out/ byte-identical
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["checkpoint-3", "checkpoint-6"]
    for step in (3, 6):
        assert verify.check_step(dest / f"checkpoint-{step}").verdict == verify.COMPLETE

    # The Trainer resumes from its own folder, as if fix had never run (and exactly).
    again = make(out)
    again.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    F.assert_equal(params(again.model), run["final"])


def test_converted_step_restores_into_from_config_model_and_trainer_optimizer(run):
    out, dest = run["out"], run["base"] / "out.async_ckpt"
    if not dest.exists():
        fix.main([str(out)])
    # --- the README's lines ------------------------------------------------------------
    with CheckpointManager(dest) as mgr:
        box = {"config": {}}
        mgr.restore(box, step=3, restore_rng=False)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(box["config"]["config.json"])))
        trainer = Trainer(model=model, args=run_args(run["base"] / "scratch"))   # the run's arguments
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        mgr.restore({"model": model, "optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler}, step=3)
    # --------------------------------------------------------------------------------------
    src = out / "checkpoint-3"
    weights = legacy.load_safetensors(src / "model.safetensors")
    assert "lm_head.weight" not in weights                       # the Trainer stores it once
    got = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(got[k], v), k
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after restore
    assert len(trainer.optimizer.param_groups) == 2              # decay / no decay
    F.assert_equal(trainer.optimizer.state_dict(), legacy.safe_torch_load(src / "optimizer.pt"))
    F.assert_equal(trainer.lr_scheduler.state_dict(), legacy.safe_torch_load(src / "scheduler.pt"))

    with CheckpointManager(dest) as mgr:
        loaded = mgr.load(3)
        assert loaded["model"]["lm_head.weight"].data_ptr() == loaded["model"]["transformer.wte.weight"].data_ptr()

        # A model that does not fit is refused before any weight is touched...
        other = GPT2LMHeadModel(config(n_inner=32))
        kept = params(other)
        with pytest.raises(RestoreError, match="shape"):
            mgr.restore({"model": other}, step=3, restore_rng=False)
        F.assert_equal(params(other), kept)
        # ...and so is an optimizer with other parameter groups than the Trainer's, model untouched.
        fresh = GPT2LMHeadModel(config())
        untouched = params(fresh)
        with pytest.raises(RestoreError, match="parameter groups of sizes"):
            mgr.restore({"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters())}, step=3,
                        restore_rng=False)
        F.assert_equal(params(fresh), untouched)


def test_async_checkpoint_trainer_resumes_from_the_converted_step(run):
    out, dest = run["out"], run["base"] / "out.async_ckpt"
    if not dest.exists():
        fix.main([str(out)])
    trainer = make(run["base"] / "ours", cls=AsyncCheckpointTrainer, checkpoint_dir=dest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # step 6 exists already: not saved again
        trainer.train(resume_from_checkpoint=3)
    F.assert_equal(params(trainer.model), run["final"])


def test_tied_aliases_need_the_class_and_respect_the_config(tmp_path):
    w = {"transformer.wte.weight": torch.zeros(2)}
    assert legacy.tied_aliases({"architectures": ["GPT2LMHeadModel"]}, w)[0] == \
        {"lm_head.weight": "transformer.wte.weight"}
    assert legacy.tied_aliases({"architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": False}, w)[0] == {}
    assert legacy.tied_aliases({"architectures": ["GPT2LMHeadModel"]},
                               {**w, "lm_head.weight": torch.ones(2)})[0] == {}
    for bogus in ("os.system", "__class__", "AutoConfig", 7, "x" * 500):
        aliases, _ = legacy.tied_aliases({"architectures": [bogus]}, w)
        assert aliases == {}
