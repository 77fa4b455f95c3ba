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
