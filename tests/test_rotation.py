import pytest

from async_ckpt.options import CheckpointManagerOptions
from async_ckpt.rotation import steps_to_delete


def opts(**kw):
    return CheckpointManagerOptions(**kw)


def test_latest_n():
    assert steps_to_delete([1, 2, 3, 4, 5], {}, opts(max_to_keep=2)) == [1, 2, 3]


def test_keep_all_when_unbounded():
    assert steps_to_delete([1, 2, 3], {}, opts(max_to_keep=None)) == []


def test_keep_every_n_steps_survives_rotation():
    assert steps_to_delete([10, 15, 20, 25, 30], {}, opts(max_to_keep=1, keep_every_n_steps=20)) == [10, 15, 25]


@pytest.mark.parametrize("mode,expected_kept", [("min", {3, 5}), ("max", {1, 5})])
def test_best_n_by_metric_never_deletes_newest(mode, expected_kept):
    metrics = {1: {"loss": 9.0}, 2: {"loss": 5.0}, 3: {"loss": 1.0}, 4: {"loss": 4.0}, 5: {"loss": 7.0}}
    doomed = steps_to_delete([1, 2, 3, 4, 5], metrics, opts(max_to_keep=1, best_metric="loss", best_mode=mode))
    assert set([1, 2, 3, 4, 5]) - set(doomed) == expected_kept


def test_steps_without_metric_rank_worst():
    metrics = {1: {"loss": 1.0}, 2: {}, 3: {"loss": float("nan")}, 4: {"loss": 2.0}}
    doomed = steps_to_delete([1, 2, 3, 4], metrics, opts(max_to_keep=2, best_metric="loss"))
    assert doomed == [2, 3]


def test_empty():
    assert steps_to_delete([], {}, opts()) == []


@pytest.mark.parametrize("kw", [dict(max_to_keep=0), dict(best_mode="median"), dict(compression="lz4"),
                                dict(io_threads=0), dict(max_inflight_saves=0), dict(chunk_bytes=100),
                                dict(save_interval_steps=0), dict(snapshot="later")])
def test_options_reject_bad_values(kw):
    with pytest.raises(ValueError):
        CheckpointManagerOptions(**kw)


def test_options_env_override(monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_IO_THREADS", "3")
    monkeypatch.setenv("ASYNC_CKPT_COMPRESSION", "none")
    o = CheckpointManagerOptions()
    assert o.io_threads == 3 and o.compression is None
    assert CheckpointManagerOptions(io_threads=5).io_threads == 5
