import torch

from async_ckpt import ResumableSampler, train_val_split


def test_mid_epoch_resume_continues_the_same_order():
    a = ResumableSampler(103, seed=7)
    straight = [a.next_batch(10) for _ in range(25)]     # crosses two epoch boundaries
    b = ResumableSampler(103, seed=7)
    first = [b.next_batch(10) for _ in range(13)]
    saved = b.state_dict()
    c = ResumableSampler(103, seed=0)
    c.load_state_dict(saved)
    rest = [c.next_batch(10) for _ in range(12)]
    assert first + rest == straight


def test_iter_resumes_mid_epoch_and_epochs_differ():
    s = ResumableSampler(50, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(20)]
    state = s.state_dict()
    assert state["position"] == 20 and state["epoch"] == 0
    t = ResumableSampler(50, seed=3)
    t.load_state_dict(state)
    tail = list(t)
    assert sorted(head + tail) == list(range(50))
    assert t.epoch == 1 and t.position == 0
    assert list(ResumableSampler(50, seed=3)) != list(t)   # epoch 1 order differs from epoch 0


def test_dataset_size_mismatch_is_an_error():
    s = ResumableSampler(10)
    try:
        ResumableSampler(11).load_state_dict(s.state_dict())
    except ValueError as e:
        assert "10" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_train_val_split_is_deterministic_and_disjoint():
    tr, va = train_val_split(100, 0.2, seed=5)
    assert len(va) == 20 and set(tr).isdisjoint(va) and sorted(tr + va) == list(range(100))
    assert (tr, va) == train_val_split(100, 0.2, seed=5)
    assert va != train_val_split(100, 0.2, seed=6)[1]


def test_usable_with_dataloader():
    ds = torch.utils.data.TensorDataset(torch.arange(20))
    s = ResumableSampler(ds, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=s)
    batches = [b[0].tolist() for b in loader]
    assert sorted(sum(batches, [])) == list(range(20))
