"""Frozen parameters (requires_grad=False) go to a data file of their own, which a later save
hard-links from the previous step while those parameters are unchanged: the disk write of a
frozen backbone happens once. Reuse needs the same memory, version counters, lengths and
crc32c of every chunk; anything else writes the file again.
"""

import os

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
import ckpt_layout as layout
from async_ckpt.pipeline.plan import plan_save
from async_ckpt.tools.verify import CORRUPT, check_step


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.LayerNorm(256), torch.nn.Linear(256, 8))
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)                       # the frozen backbone: ~520 KB
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def train(model, opt, steps=1):
    for _ in range(steps):
        loss = model(torch.randn(16, 256)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def frozen_file(step_dir):
    return step_dir / layout.data_file_name(0, 1)


def options(**kw):
    return CheckpointManagerOptions(chunk_bytes=1 << 16, max_to_keep=None, **kw)


def assert_loads_as(mgr, step, model):
    tree = mgr.load(step)
    for k, v in model.state_dict().items():
        assert torch.equal(tree["model"][k], v), k


def test_plan_puts_frozen_parameters_last_in_chunks_of_their_own():
    model, opt = make()
    plan = plan_save({"model": model, "optimizer": opt}, 1 << 16)
    frozen_ptrs = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    assert 0 < plan.frozen_from < len(plan.chunks)
    tail_start = plan.chunks[plan.frozen_from].start
    for i, ref in enumerate(plan.arrays):
        if not ref.nbytes:
            continue
        is_frozen = isinstance(ref.value, torch.Tensor) and ref.value.data_ptr() in frozen_ptrs
        assert (plan.offsets[i] >= tail_start) == is_frozen
        assert all((c >= plan.frozen_from) == is_frozen for c, _, _ in plan.parts[i])
    assert len(plan.frozen_signature) == len(frozen_ptrs)
    unfrozen = torch.nn.Linear(4, 4)
    plan = plan_save({"model": unfrozen}, 1 << 16)
    assert plan.frozen_from == len(plan.chunks)
    assert plan.frozen_signature == ()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_unchanged_frozen_file_is_hard_linked_and_loads(tmp_path, mode, compression):
    model, opt = make()
    with CheckpointManager(tmp_path, options(snapshot=mode, compression=compression)) as mgr:
        train(model, opt)
        first = mgr.save(1, {"model": model, "optimizer": opt})
        train(model, opt)
        second = mgr.save(2, {"model": model, "optimizer": opt})
        assert first.linked_bytes == 0
        assert second.linked_bytes == os.path.getsize(frozen_file(second.path)) > 0
        assert os.path.samefile(frozen_file(first.path), frozen_file(second.path))
        assert os.stat(frozen_file(second.path)).st_nlink == 2
        assert_loads_as(mgr, 2, model)
        report = check_step(second.path, deep=True)
        assert report.verdict != CORRUPT
        assert any("hard link shared with 1 other" in n for n in report.notes), report.notes


def test_rotation_keeps_the_linked_data(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, CheckpointManagerOptions(chunk_bytes=1 << 16, max_to_keep=1)) as mgr:
        for step in range(1, 5):
            train(model, opt)
            result = mgr.save(step, {"model": model, "optimizer": opt})
            assert result.linked_bytes == (0 if step == 1 else os.path.getsize(frozen_file(result.path)))
        assert mgr.all_steps() == [4]
        assert os.stat(frozen_file(result.path)).st_nlink == 1
        assert_loads_as(mgr, 4, model)


@pytest.mark.parametrize("max_shared", [1, 3])
def test_a_file_is_shared_by_at_most_frozen_max_shared_steps(tmp_path, max_shared):
    model, opt = make()
    with CheckpointManager(tmp_path, options(frozen_max_shared=max_shared)) as mgr:
        linked = [mgr.save(step, {"model": model, "optimizer": opt}).linked_bytes > 0 for step in range(1, 9)]
        inodes = [os.stat(frozen_file(tmp_path / f"checkpoint-{s}")).st_ino for s in range(1, 9)]
    if max_shared == 1:
        assert not any(linked) and len(set(inodes)) == 8
    else:      # written, linked, linked, written afresh, ...
        assert linked == [False, True, True, False, True, True, False, True]
        assert [inodes.count(i) for i in dict.fromkeys(inodes)] == [3, 3, 2]
    with pytest.raises(ValueError, match="frozen_max_shared"):
        CheckpointManagerOptions(frozen_max_shared=0)


@pytest.mark.parametrize("how", ["in_place", "through_data", "unfreeze"])
def test_a_changed_frozen_parameter_is_written_again(tmp_path, how):
    model, opt = make()
    with CheckpointManager(tmp_path, options()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        w = model[0].weight
        if how == "in_place":
            with torch.no_grad():
                w.mul_(2)                                # bumps the version counter
        elif how == "through_data":
            w.data[0, 0] += 1                            # .data does not: the crc32c catches it
        else:
            w.requires_grad_(True)                       # no longer frozen: laid out elsewhere
        result = mgr.save(2, {"model": model, "optimizer": opt})
        assert result.linked_bytes == 0
        if how != "unfreeze":
            assert not os.path.samefile(frozen_file(tmp_path / "checkpoint-1"), frozen_file(result.path))
        assert_loads_as(mgr, 2, model)


def test_missing_previous_file_falls_back_to_writing(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, options()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        mgr.delete(1)
        result = mgr.save(2, {"model": model, "optimizer": opt})
        assert result.linked_bytes == 0 and os.stat(frozen_file(result.path)).st_nlink == 1
        assert_loads_as(mgr, 2, model)


def test_a_symlink_in_place_of_the_previous_file_is_not_followed(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, options()) as mgr:
        first = mgr.save(1, {"model": model, "optimizer": opt})
        target = frozen_file(first.path)
        moved = tmp_path / "elsewhere.bin"
        os.rename(target, moved)
        os.symlink(moved, target)
        result = mgr.save(2, {"model": model, "optimizer": opt})
        assert result.linked_bytes == 0 and not frozen_file(result.path).is_symlink()
        assert_loads_as(mgr, 2, model)


def test_a_new_process_writes_the_frozen_file_once_then_links(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, options()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    with CheckpointManager(tmp_path, options()) as mgr:     # no memory of what step 1 held
        assert mgr.save(2, {"model": model, "optimizer": opt}).linked_bytes == 0
        assert mgr.save(3, {"model": model, "optimizer": opt}).linked_bytes > 0


def test_reuse_can_be_turned_off(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, options(reuse_frozen=False)) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        result = mgr.save(2, {"model": model, "optimizer": opt})
        assert result.linked_bytes == 0 and not frozen_file(result.path).exists()
        assert_loads_as(mgr, 2, model)


def test_lazy_mode_defers_frozen_parameters_only_behind_an_optimizer_fence(tmp_path):
    model, opt = make()
    with CheckpointManager(tmp_path, options(snapshot="lazy")) as mgr:
        state = {"model": model, "optimizer": opt}
        plan = plan_save(state, 1 << 16)
        deferred = mgr._arm_fence(state, plan)
        assert set(plan.frozen_arrays) <= deferred and plan.frozen_arrays
        assert not mgr._arm_fence({"model": model}, plan_save({"model": model}, 1 << 16))
        train(model, opt)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save_async(1, state)
        train(model, opt)                              # the fenced step waits for every copy
        with torch.no_grad():
            model[0].weight.add_(1.0)                  # e.g. an EMA-style update after the step
        mgr.wait_until_finished()
        tree = mgr.load(1)
    for k, v in saved.items():
        assert torch.equal(tree["model"][k], v), k
