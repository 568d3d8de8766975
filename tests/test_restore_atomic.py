"""A restore that raises leaves the caller's objects as they were (the default, atomic mode)."""

from __future__ import annotations

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, ChecksumError, RestoreError


def opts(**kw):
    return CheckpointManagerOptions(handle_sigterm=False, io_threads=2, compression=None,
                                    chunk_bytes=64 << 10, **kw)


def model_of(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])   # 16 tensors, weights > chunk


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def flip_last_chunk(step_dir) -> None:
    data = step_dir / "data-r0-0.bin"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01                     # near the end: most tensors decode before it
    data.write_bytes(bytes(raw))


def test_checksum_failure_overwrites_no_live_tensor(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": model_of(1), "progress": {"step": 1}})
    flip_last_chunk(tmp_path / "checkpoint-1")
    live = model_of(2)
    before = snapshot(live)
    progress = {"step": 0}
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(ChecksumError):
            mgr.restore({"model": live, "progress": progress})
    for k, v in live.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert progress == {"step": 0}


def test_non_atomic_restore_is_the_documented_exception(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": model_of(1)})
    flip_last_chunk(tmp_path / "checkpoint-1")
    live = model_of(2)
    before = snapshot(live)
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(ChecksumError):
            mgr.restore({"model": live}, atomic=False)
    changed = [k for k, v in live.state_dict().items() if not torch.equal(v, before[k])]
    assert changed                        # direct decode: what was read is already in place


def test_mismatched_second_item_applies_nothing(tmp_path):
    saved_a, saved_b = model_of(1), torch.nn.Linear(4, 4)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": saved_a, "b": saved_b})
    live_a, live_b = model_of(2), torch.nn.Linear(4, 5)       # b's shape differs
    before = snapshot(live_a)
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(RestoreError, match=r"b\['weight'\]: shape"):
            mgr.restore({"a": live_a, "b": live_b})
    for k, v in live_a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_missing_module_key_is_refused_before_copying(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": torch.nn.Linear(4, 4, bias=False)})
    live = torch.nn.Linear(4, 4)
    before = snapshot(live)
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(RestoreError, match="missing key"):
            mgr.restore({"model": live})
    assert torch.equal(live.weight, before["weight"])


def test_a_shared_chunk_claiming_more_than_its_arrays_hold_is_refused(tmp_path):
    import dataclasses

    from async_ckpt.errors import RestoreError as Refused
    from async_ckpt.pipeline.restore import read_arrays
    from async_ckpt.storage.native_files import NativeStorage

    import ckpt_layout as layout

    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"small": {"a": torch.ones(4), "b": torch.zeros(3)}})
    manifest = layout.read_manifest(tmp_path / "checkpoint-1")
    slab = manifest.section(0).arrays[0].parts[0][0]
    chunks = list(manifest.chunks)
    chunks[slab] = dataclasses.replace(chunks[slab], raw_length=1 << 30)   # a lie of 1 GiB
    liar = dataclasses.replace(manifest, chunks=tuple(chunks))
    with pytest.raises(Refused, match="refusing to allocate"):
        read_arrays(NativeStorage(io_threads=1), str(tmp_path / "checkpoint-1"), liar)


def test_optimizer_with_other_param_groups_is_refused_before_the_model_changes(tmp_path):
    saved = model_of(1)
    opt = torch.optim.AdamW([{"params": list(saved.parameters())[:8]}, {"params": list(saved.parameters())[8:]}])
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": saved, "optimizer": opt})
    live = model_of(2)
    before = snapshot(live)
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(RestoreError, match="parameter groups of sizes"):
            mgr.restore({"model": live, "optimizer": torch.optim.AdamW(live.parameters())})
    for k, v in live.state_dict().items():
        assert torch.equal(v, before[k]), k


class Refuses(torch.nn.Sequential):
    """Passes every check before applying, then fails in load_state_dict (as a module with a
    custom loader can)."""

    def load_state_dict(self, *args, **kwargs):
        raise RuntimeError("this module refuses its state")


def test_an_item_failing_while_applied_keeps_its_tensors_and_the_next_items(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": model_of(1), "b": Refuses(*model_of(2)), "c": model_of(3)})
        want_a = snapshot(model_of(1))
        live_a, live_b, live_c = model_of(4), Refuses(*model_of(5)), model_of(6)
        before_b, before_c = snapshot(live_b), snapshot(live_c)
        with pytest.raises(RestoreError, match=r"refuses its state.*\['a'\] were already restored"):
            mgr.restore({"a": live_a, "b": live_b, "c": live_c}, step=1)
    for k, v in live_a.state_dict().items():
        assert torch.equal(v, want_a[k]), k
    for live, before in ((live_b, before_b), (live_c, before_c)):
        for k, v in live.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_a_mismatch_found_after_reading_puts_the_tensors_back(tmp_path, monkeypatch):
    from async_ckpt.pipeline import restore
    read_in_place: list[int] = []
    real = restore._in_place

    def spy(*args, single_owner):
        out = real(*args, single_owner=single_owner)
        read_in_place.append(sum(len(v) for v in out.values()))
        return out

    monkeypatch.setattr(restore, "_in_place", spy)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": model_of(1), "b": torch.nn.Linear(4, 4)})
        live_a, live_b = model_of(2), torch.nn.Linear(4, 5)
        before = snapshot(live_a)
        with pytest.raises(RestoreError, match="shape"):
            mgr.restore({"a": live_a, "b": live_b}, step=1)
    assert read_in_place == [16]          # a's 16 tensors were overwritten first
    for k, v in live_a.state_dict().items():
        assert torch.equal(v, before[k]), k


def flip_first_chunk(step_dir) -> None:
    data = step_dir / "data-r0-0.bin"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("flip", [flip_first_chunk, flip_last_chunk], ids=["first", "last"])
def test_a_bad_chunk_and_a_mismatch_together_raise_the_read_error_and_change_nothing(tmp_path, flip):
    """The shapes are checked while the chunks are read: the read's error wins, and neither
    the storage's own put-back nor the check's roll-back (whose backups a failed read may
    not have filled) leaves other bytes."""
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": model_of(1), "b": torch.nn.Linear(4, 4)})
    flip(tmp_path / "checkpoint-1")
    live_a, live_b = model_of(2), torch.nn.Linear(4, 5)
    before = snapshot(live_a)
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(ChecksumError):
            mgr.restore({"a": live_a, "b": live_b}, step=1)
    for k, v in live_a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_tree_is_decoded_and_checked_while_the_chunks_are_read(tmp_path, monkeypatch):
    """The read waits until decoding has started: done one after the other, it times out."""
    import threading

    from async_ckpt.pipeline import restore

    decoding = threading.Event()
    real_decode, real_read = restore.decode_items, None

    def decode(*args, **kw):
        decoding.set()
        return real_decode(*args, **kw)

    monkeypatch.setattr(restore, "decode_items", decode)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(300)}    # shared chunks: views
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": tensors})
        real_read = mgr._storage.read

        def read(*args, **kw):
            assert decoding.wait(10), "the tree was decoded only after the read"
            return real_read(*args, **kw)

        monkeypatch.setattr(mgr._storage, "read", read)
        live = {k: torch.zeros(100) for k in tensors}
        mgr.restore({"model": live}, step=1)
    assert all(torch.equal(live[k], t) for k, t in tensors.items())
