"""Trainer mechanics: a curriculum declared by the task, --compile failing cleanly, the bench's measures."""

from dataclasses import dataclass

import pytest
import torch

from conftest import cli
from iclbench import Batch, Task
from iclbench.bench import saved_activation_bytes
from iclbench.config import TrainOptions
from iclbench.errors import ICLBenchError
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.trainer import train

CPU = torch.device("cpu")


@dataclass
class RampOptions:
    context_len: int = 8


class RampTask(Task):
    """y_t = t * slope; records the context length of every training batch it is asked for."""

    name = "ramp"
    Options = RampOptions
    d_in = d_out = 1
    seen: list = []

    @property
    def context_len(self):
        return self.options.context_len

    def sample(self, n, generator, device="cpu"):
        T = self.options.context_len
        RampTask.seen.append((n, T))
        y = torch.rand(n, 1, 1, generator=generator, device=device) * torch.arange(T + 1, device=device)[:, None]
        return Batch(y[:, :-1], y[:, 1:], torch.ones(T, dtype=torch.bool, device=device))

    def curriculum(self, step, steps):  # Garg et al.'s shape: start short, grow in stages
        return {"context_len": 4} if step < steps // 2 else {}


def tiny_gpt(n_ctx=8):
    torch.manual_seed(0)
    return GPT(GPTOptions(n_layers=1, d_model=16, n_heads=2, d_mlp=16), 1, 1, n_ctx)


def test_curriculum_declared_by_the_task_changes_what_is_trained_on():
    RampTask.seen = []
    train(tiny_gpt(), RampTask(), TrainOptions(steps=6, batch_size=4, warmup=0), seed=0, device=CPU)
    assert [T for n, T in RampTask.seen if n == 4] == [4, 4, 4, 8, 8, 8]  # (the rest: normalizers)


def test_curriculum_with_an_unknown_option_is_one_clear_error():
    class Broken(RampTask):
        def curriculum(self, step, steps):
            return {"n_dims": 3}

    with pytest.raises(ICLBenchError, match="curriculum at step 0 sets {'n_dims': 3}"):
        train(tiny_gpt(), Broken(), TrainOptions(steps=2, batch_size=2), seed=0, device=CPU)


@pytest.mark.parametrize("where", ["at compile()", "at the first step"])
def test_compile_failure_is_one_line(monkeypatch, where):
    def failing_compile(model, **kw):
        if where == "at compile()":
            raise RuntimeError("Dynamo is not supported on this Python\nlong compiler traceback ...")

        def call(*args):
            raise RuntimeError("InductorError: C++ compile error\nmore lines ...")

        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(ICLBenchError) as info:
        train(tiny_gpt(), RampTask(), TrainOptions(steps=2, batch_size=2, compile=True), seed=0, device=CPU)
    message = str(info.value)
    assert "--compile is not supported here" in message and "run without --compile" in message
    assert "\n" not in message


def test_saved_activation_bytes_counts_what_backward_keeps_and_not_the_weights():
    layer = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(16, 8)
    # the weight gradient needs the input (16 x 8 floats); sum() keeps nothing; the weight is not counted
    assert saved_activation_bytes(layer, lambda: layer(x).sum().backward()) == 16 * 8 * 4


@pytest.mark.slow
def test_bench_prints_throughput_and_memory():
    out = cli("bench", "--task", "affine", "--model", "gpt1l", "--rounds", "1", "--steps", "1", "--no-tl",
              "--set", "train.batch_size=8", "--scaling", "--scaling-models", "gpt1l",
              "--scaling-contexts", "8,16")
    assert out.returncode == 0, out.stderr
    for text in ("training tokens/s", "forward + cache tokens/s", "activations kept for backward",
                 "| gpt1l ", "T=16"):
        assert text in out.stdout, out.stdout
    bad = cli("bench", "--task", "affine", "--model", "gpt1l", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds and --steps must be >= 1" in bad.stderr


class PoisonTask(RampTask):
    """A ramp whose ``bad``-th training batch (counted from 1) has a NaN target."""

    bad = 7

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = 0

    def sample(self, n, generator, device="cpu"):
        batch = super().sample(n, generator, device)
        if n == 4:  # a training batch, not the normalizer's
            self.calls += 1
            if self.calls == self.bad:
                batch.targets[0, 0, 0] = float("nan")
        return batch

    def curriculum(self, step, steps):
        return {}


def test_divergence_is_found_on_the_device_and_names_the_first_bad_step():
    from iclbench.errors import TrainingDiverged

    logged = []
    with pytest.raises(TrainingDiverged, match="diverged at step 7:"):
        train(tiny_gpt(), PoisonTask(), TrainOptions(steps=20, batch_size=4, warmup=0, log_every=5), seed=0,
              device=CPU, log=lambda step, m: logged.append((step, m["loss"])))
    assert logged[0][0] == 5 and logged[-1][0] == 7 and logged[-1][1] != logged[-1][1]  # the NaN step


def test_masked_loss_without_boolean_indexing_is_bitwise_the_same():
    from iclbench.step import mask_index, training_loss

    gen = torch.Generator().manual_seed(1)
    pred, targets = torch.randn(5, 9, 2, generator=gen), torch.randn(5, 9, 2, generator=gen)
    mask = torch.arange(9) >= 3
    batch, norm = Batch(targets, targets, mask), torch.rand(9, generator=gen) + 0.5
    old = ((pred - targets).pow(2).mean(-1) / norm)[:, mask].mean()
    assert torch.equal(training_loss(pred, batch, norm, mask_index(mask)), old)
    full = Batch(targets, targets, torch.ones(9, dtype=torch.bool))
    assert mask_index(full.mask) is None
    assert torch.equal(training_loss(pred, full, norm, None), ((pred - targets).pow(2).mean(-1) / norm).mean())


def test_the_training_step_never_waits_for_the_device():
    """No op that needs the value on the host (``.item()``, boolean indexing's ``nonzero``) runs in a step
    once the stage's scored positions are known; seen through the dispatcher, so it holds for any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from iclbench.step import OneModel, mask_index
    from iclbench.trainer import DeviceLoss

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, task = tiny_gpt(), RampTask()
    o = TrainOptions(steps=2, batch_size=4)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    batch.mask = torch.arange(8) >= 2
    stepper, acc, scored = OneModel(model, o, CPU), DeviceLoss(CPU, [0.0]), mask_index(batch.mask)
    norm = task.normalizer(CPU)
    with Ops() as ops:
        for step in range(2):
            acc.add(stepper.step([batch], norm, [1e-3], scored), step + 1)
    assert not ops.seen & {"_local_scalar_dense", "nonzero", "masked_select", "item", "equal", "is_nonzero"}
    assert "index_select" in ops.seen


@pytest.mark.slow  # Hugging Face transformers
def test_hf_gpt2_contender_matches_our_model_size_and_trains():
    """The bench's Garg et al. contender has our model's size (same layers, widths and positions; its unused
    token embedding is one row of d_model) and trains through the trainer's own step."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install 'iclbench[hf]')")
    from iclbench.bench import fixed_batches, hf_gpt2_twin, training_step
    from iclbench.config import resolve
    from iclbench.registry import get_registry
    from iclbench.build import build

    cfg = resolve(get_registry(), task="affine", model="gpt2l", device="cpu",
                  overrides=["model.d_model=32", "model.d_mlp=64", "train.batch_size=8"])
    task, model = build(get_registry(), cfg, torch.device("cpu"))
    twin = hf_gpt2_twin(model, task, cfg)
    ours = sum(p.numel() for p in model.parameters())
    assert 0 <= sum(p.numel() for p in twin.parameters()) - ours <= cfg.model_options.d_model
    batches = fixed_batches(task, 8, torch.device("cpu"))
    assert twin(batches[0].inputs).shape == batches[0].targets.shape
    before = [p.detach().clone() for p in twin.parameters()]
    training_step(twin, task, cfg, batches)()
    assert any(not torch.equal(a, b) for a, b in zip(before, twin.parameters()))
