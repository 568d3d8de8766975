import os

import pytest

# Keep tests deterministic and light on a 2-core machine.
os.environ.setdefault("ASYNC_CKPT_IO_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long fault-injection runs (deselected by default)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


@pytest.fixture
def small_model():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched

