"""Hugging Face Trainer + async_ckpt: a resumed run continues bit for bit.

A tiny GPT-2 (dropout on, shuffled data, AdamW, warmup + linear decay, gradient
accumulation) trains straight through; a second run is SIGKILLed in another process
mid-epoch, a third resumes it from the latest committed step with a model built from
another seed. Per-step losses after the resumed step, the final parameters and the
optimizer moments must be bitwise equal. Retention and load_best_model_at_end are
compared against the Trainer's own folders.

Run as a script (`python tests/test_integration_hf.py worker OUT STOP`) it is the worker
that gets killed.
"""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from async_ckpt import CheckpointManager, CheckpointManagerOptions, SaveError
from async_ckpt.integrations import IntegrationError
from async_ckpt.integrations.hf import AsyncCheckpointTrainer, hf_steps_to_delete
from bitwise import bits

N_SAMPLES, SEQ, VOCAB = 40, 16, 64


class Data(torch.utils.data.Dataset):
    def __init__(self, n=N_SAMPLES, seed=123):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Interrupt(TrainerCallback):
    """At step `at`: wait for the queued saves to commit, then die like a preempted job."""

    def __init__(self, at, kill):
        self.at, self.kill, self.trainer = at, kill, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.trainer.checkpoint_manager.wait_until_finished()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated crash")


def make_trainer(out, cls=AsyncCheckpointTrainer, model_seed=0, stop=None, kill=False, options=None,
                 checkpoint_dir=None, **overrides):
    torch.manual_seed(model_seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                                        bos_token_id=0, eos_token_id=0))
    kw = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              save_strategy="steps", save_steps=3, learning_rate=2e-3, warmup_steps=2, seed=7, use_cpu=True,
              report_to=[], disable_tqdm=True, logging_strategy="no")
    kw.update(overrides)
    losses = {}

    class Recording(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.setdefault(self.state.global_step + 1, []).append(loss.detach().clone())
            return loss

    cb = [Interrupt(stop, kill)] if stop is not None else []
    extra = {"checkpoint_options": options} if options is not None else {}
    if checkpoint_dir is not None:
        extra["checkpoint_dir"] = checkpoint_dir
    trainer = Recording(model=model, args=TrainingArguments(**kw), train_dataset=Data(),
                        eval_dataset=Data(8, seed=9), callbacks=cb, **extra)
    for c in cb:
        c.trainer = trainer
    return trainer, losses


def assert_bitwise(a, b, what):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), what
    elif isinstance(a, dict):
        assert list(a) == list(b), what
        for k in a:
            assert_bitwise(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_resumed_exactly(straight, straight_losses, resumed, resumed_losses, resumed_from):
    assert min(resumed_losses) == resumed_from + 1
    assert sorted(resumed_losses) == [s for s in sorted(straight_losses) if s > resumed_from]
    for step, losses in resumed_losses.items():
        assert_bitwise(straight_losses[step], losses, f"losses of step {step}")
    assert_bitwise(straight.model.state_dict(), resumed.model.state_dict(), "parameters")
    assert_bitwise(straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"],
                   "optimizer moments")
    assert_bitwise(straight.lr_scheduler.state_dict(), resumed.lr_scheduler.state_dict(), "scheduler")
    assert resumed.state.global_step == straight.state.global_step


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    trainer, losses = make_trainer(tmp_path_factory.mktemp("straight"))
    trainer.train()
    return trainer, losses


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(straight, tmp_path):
    # 10 batches per epoch, 2 per step: 5 steps per epoch. Killed at step 8 with steps 3
    # and 6 committed: the resume starts mid-epoch 1 and skips 2 batches of it.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, __file__, "worker", str(out), "8"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resumed, losses = make_trainer(out, model_seed=1)    # other weights: restore must overwrite them
    assert resumed.checkpoint_manager.all_steps() == [3, 6]
    resumed.train(resume_from_checkpoint=True)
    assert_resumed_exactly(*straight, resumed, losses, resumed_from=6)


@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
def test_crash_at_epoch_boundary_then_resume_from_step_is_bitwise_identical(straight, tmp_path, snapshot):
    out = tmp_path / "run"
    opts = CheckpointManagerOptions(snapshot=snapshot)    # lazy: the next optimizer step is fenced
    crashed, _ = make_trainer(out, stop=11, save_steps=5, options=opts)      # saves 5 and 10 (an epoch end)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    resumed, losses = make_trainer(out, model_seed=1, save_steps=5, options=opts)
    resumed.train(resume_from_checkpoint=str(out / "async_ckpt" / "checkpoint-10"))
    assert_resumed_exactly(*straight, resumed, losses, resumed_from=10)


@pytest.mark.parametrize("limit", [1, 2])
def test_retention_and_best_model_mean_what_the_trainer_means(tmp_path, limit):
    # greater_is_better on eval_loss: the best step is an early one, so rotation has to protect it.
    common = dict(max_steps=10, gradient_accumulation_steps=1, save_steps=2, eval_strategy="steps",
                  eval_steps=2, save_total_limit=limit, metric_for_best_model="eval_loss",
                  greater_is_better=True, load_best_model_at_end=True)
    theirs, _ = make_trainer(tmp_path / "hf", cls=Trainer, **common)
    theirs.train()
    ours, _ = make_trainer(tmp_path / "ours", **common)
    ours.train()
    hf_steps = sorted(int(m.group(1)) for d in os.listdir(tmp_path / "hf")
                      if (m := re.fullmatch(r"checkpoint-(\d+)", d)))
    with CheckpointManager(ours.checkpoint_dir) as mgr:
        assert mgr.all_steps() == hf_steps
    assert theirs.state.best_global_step == ours.state.best_global_step < 10
    assert os.path.basename(theirs.state.best_model_checkpoint) == os.path.basename(ours.state.best_model_checkpoint)
    assert_bitwise(theirs.model.state_dict(), ours.model.state_dict(), "best model loaded at end")


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    # One step of this model is ~210 kB: the first save fits, the second runs out of space.
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_failed_background_save_stops_training_with_its_error(tmp_path, small_tmpfs):
    trainer, losses = make_trainer(tmp_path / "out", checkpoint_dir=small_tmpfs)
    with pytest.raises(SaveError) as info:
        trainer.train()          # step 6's save fails on the commit thread
    # Raised by the next save (step 9), or when train() waits for the saves at the end.
    assert info.value.step == 6 and max(losses) in (9, 12)
    with CheckpointManager(small_tmpfs) as mgr:
        assert mgr.all_steps() == [3]     # the earlier step is intact; no half-written step listed
    assert not any(p.name.startswith(".checkpoint-") for p in small_tmpfs.iterdir())


def test_rotation_policy_is_the_trainers():
    assert hf_steps_to_delete([2, 4, 6, 8], 2, best=None) == [2, 4]
    assert hf_steps_to_delete([2, 4, 6, 8], 2, best=2) == [4, 6]
    assert hf_steps_to_delete([2, 4, 6, 8], 1, best=2) == [4, 6]
    assert hf_steps_to_delete([2, 4, 6, 8], 1, best=2, protect=(6,)) == [4]
    assert hf_steps_to_delete([2, 4], None, best=None) == []


def test_resume_arguments(tmp_path):
    trainer, _ = make_trainer(tmp_path / "empty")
    with pytest.raises(IntegrationError, match="holds no committed checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(IntegrationError, match="neither a step"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))


def _worker(out, stop):
    trainer, _ = make_trainer(out, stop=stop, kill=True)
    trainer.train()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], int(sys.argv[3]))
