"""Every registered task's baselines obey the no-peeking contract and are vectorised over the batch."""

import pytest
import torch

from iclbench.registry import get_registry

REG = get_registry()


@pytest.mark.slow
@pytest.mark.parametrize("task_name", sorted(REG.tasks))
def test_baselines_use_only_the_context_before_each_position(task_name):
    task = REG.task(task_name)()
    batch = task.sample(8, torch.Generator().manual_seed(0))
    T = task.context_len
    for name, entry in REG.task_baselines(task).items():
        if name == "oracle":
            continue  # the oracle reads the latent parameters by design
        full = entry.obj(batch)
        assert full.shape == batch.targets.shape, name
        for t in (0, T // 2, T - 2):
            tampered = batch.slice(slice(None))
            tampered.inputs = batch.inputs.clone()
            tampered.inputs[:, t + 1:] += 100.0  # change the future only
            tampered.targets = batch.targets + 100.0
            assert torch.allclose(entry.obj(tampered)[:, : t + 1], full[:, : t + 1], atol=1e-5), (name, t)
        # vectorised: one sequence alone gets the same prediction as inside the batch
        assert torch.allclose(entry.obj(batch.slice(slice(2, 3))), full[2:3], atol=1e-5), name
