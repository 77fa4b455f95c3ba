"""The models' CPU GEMM on MKL or oneDNN (iclbench.gemm): equal results, selection by measurement, the cache."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from iclbench import gemm
from iclbench.config import TrainOptions
from iclbench.errors import ICLBenchError
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.registry import get_registry
from iclbench.stacked import StackedSeeds
from iclbench.step import make_optimizer, mask_index, train_step

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN absent from this torch")


@pytest.fixture
def path(monkeypatch, tmp_path):
    """Set ``ICLBENCH_GEMM``; a fresh selector with its cache in ``tmp_path`` (the process's is restored)."""
    old = gemm.set_selector(gemm.Selector(tmp_path / "cache"))
    yield lambda value: monkeypatch.setenv(gemm.ENV, value)
    gemm.set_selector(old)


class Boom(torch.autograd.Function):
    @staticmethod
    def apply(*args):
        raise AssertionError("the oneDNN path was taken")


def through_onednn(y: torch.Tensor) -> bool:
    """Whether ``y`` came out of the oneDNN autograd.Function (possibly reshaped)."""
    fn = y.grad_fn
    if fn is not None and "_Linear" not in type(fn).__name__ and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn is not None and "_Linear" in type(fn).__name__


def grads(fn, x, w, b):
    y = fn(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return (y, *torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g))


@pytest.mark.parametrize("shape,n,bias", [((7, 5), 3, True), ((4, 9, 16), 48, True), ((4, 9, 16), 48, False),
                                          ((2, 3, 5, 8), 1, True), ((64, 16, 64), 256, False)])
def test_onednn_path_equals_f_linear_forward_and_gradients(path, shape, n, bias):
    path("onednn")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = torch.randn(n, shape[-1], generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True) if bias else None
    y = gemm.linear(x, w, b)
    assert through_onednn(y)
    for got, ref in zip(grads(gemm.linear, x, w, b), grads(F.linear, x, w, b)):
        assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("choice", [gemm.Choice(True, False, False), gemm.Choice(False, True, False),
                                    gemm.Choice(False, False, True), gemm.ONEDNN])
def test_each_gemm_on_either_path_gives_the_same_gradients(choice):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 20, generator=gen, requires_grad=True)
    w = torch.randn(12, 20, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    for got, ref in zip(grads(lambda *a: gemm._Linear.apply(*a, choice), x, w, b), grads(F.linear, x, w, b)):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_double_backward_falls_back_to_differentiable_ops(path):
    path("onednn")
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)

    def second(fn):
        (gx,) = torch.autograd.grad(fn(x, w).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w)[0]

    assert torch.allclose(second(gemm.linear), second(F.linear), rtol=1e-5, atol=1e-5)


def test_plain_f_linear_where_onednn_must_not_run(path, monkeypatch):
    path("onednn")
    monkeypatch.setattr(gemm, "_Linear", Boom)
    monkeypatch.setattr(gemm, "_dnn", Boom.apply)
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    ref = F.linear(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: F.linear's casts
        assert gemm.linear(x, w, b).dtype == torch.bfloat16
    assert torch.equal(gemm.linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    assert torch.equal(gemm.linear(x[0], w, b), F.linear(x[0], w, b))  # 1-D input
    xs, ws, bs = torch.stack([x, x]), torch.stack([w, w]), torch.stack([b, b])
    assert torch.equal(torch.func.vmap(gemm.linear)(xs, ws, bs), torch.func.vmap(F.linear)(xs, ws, bs))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's, from forward AD's internals
        assert torch.allclose(fwAD.unpack_dual(gemm.linear(fwAD.make_dual(x, torch.ones_like(x)), w, b)).tangent,
                              (torch.ones_like(x) @ w.T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags' note that TF32 on oneDNN is for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(gemm.linear(x, w, b), ref)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert torch.equal(gemm.linear(x, w, b), ref)
    path("mkl")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert torch.equal(gemm.linear(x, w, b), ref)


def test_an_unknown_path_is_an_error(path):
    path("fast")
    with pytest.raises(ICLBenchError, match="ICLBENCH_GEMM"):
        gemm.linear(torch.randn(2, 3), torch.randn(4, 3))


def fake_timer(times, calls=None):
    """A timer that answers ``times[(what, path)]`` (seconds) and runs nothing."""
    def timer(fn, label):
        if calls is not None:
            calls.append(label)
        return times.get(label, 1.0)
    return timer


def choose(selector, M=32, K=8, N=16):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    return selector.choose(M, K, N, x, w, b)


def test_selection_picks_the_faster_path_by_the_timer(tmp_path):
    faster_forward = {("forward", "onednn"): 0.5, ("layer", "onednn"): 0.8}
    assert choose(gemm.Selector(tmp_path / "a", fake_timer(faster_forward))) == gemm.Choice(forward=True)
    all_faster = {(what, "onednn"): 0.5 for what in ("forward", "grad_input", "grad_weight", "layer")}
    assert choose(gemm.Selector(tmp_path / "b", fake_timer(all_faster))) == gemm.ONEDNN
    # each GEMM faster, the whole layer (autograd's overhead included) not: MKL
    layer_slower = {**all_faster, ("layer", "onednn"): 1.2}
    assert choose(gemm.Selector(tmp_path / "c", fake_timer(layer_slower))) == gemm.MKL
    # within the margin: a tie, MKL
    tie = {(what, "onednn"): 1 - gemm.MARGIN / 2 for what in ("forward", "grad_input", "grad_weight", "layer")}
    assert choose(gemm.Selector(tmp_path / "d", fake_timer(tie))) == gemm.MKL
    calls = []
    choose(gemm.Selector(tmp_path / "e", fake_timer({}, calls)))  # MKL everywhere: the layer is not timed
    assert {what for what, _ in calls} == {"forward", "grad_input", "grad_weight"}
    assert [p for what, p in calls if what == "forward"] == ["mkl", "onednn", "onednn", "mkl", "mkl",
                                                             "onednn", "onednn", "mkl", "mkl", "onednn"]


def test_the_measured_choice_routes_the_layer_in_auto_mode(path, tmp_path):
    path("auto")
    gemm.set_selector(gemm.Selector(tmp_path, fake_timer({("grad_weight", "onednn"): 0.1,
                                                          ("layer", "onednn"): 0.5})))
    x, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    y = gemm.linear(x, w)
    assert through_onednn(y)
    threads = torch.get_num_threads()
    assert gemm.summary() == {gemm.Selector.key(10, 8, 3, threads): "grad_weight onednn"}
    with torch.no_grad():  # forward only, on MKL: plain F.linear
        assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    assert gemm.summary()[gemm.Selector.key(10, 8, 3, threads, backward=False)] == "mkl"


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_use_without_autograd_times_the_forward_alone(path, tmp_path, context):
    path("auto")
    fast, calls = {(what, "onednn"): 0.5 for what in ("forward", "grad_input", "grad_weight", "layer")}, []
    gemm.set_selector(gemm.Selector(tmp_path, lambda fn, label: (fn(), calls.append(label), fast.get(label, 1.0))[2]))
    x, w, b = torch.randn(3, 4, 8), torch.randn(5, 8), torch.randn(5)
    with context():
        y = gemm.linear(x, w, b)
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5) and {what for what, _ in calls} == {"forward"}
    key = gemm.Selector.key(12, 8, 5, torch.get_num_threads(), backward=False)
    assert gemm.summary() == {key: "forward onednn"}
    y = gemm.linear(x, w.requires_grad_(), b)  # now trained: its own entry, all three GEMMs and the layer timed
    assert through_onednn(y) and {what for what, _ in calls} == {"forward", "grad_input", "grad_weight", "layer"}


def test_the_cache_round_trips_ignores_a_corrupt_file_and_another_machine(tmp_path):
    fast = {(what, "onednn"): 0.5 for what in ("forward", "grad_input", "grad_weight", "layer")}
    first = gemm.Selector(tmp_path, fake_timer(fast))
    assert choose(first) == gemm.ONEDNN and choose(first, M=64) == gemm.ONEDNN
    data = json.loads(first.path.read_text())
    assert data["machine"] == gemm.machine_key() and len(data["choices"]) == 2

    def never(fn, label):
        raise AssertionError("measured again")

    again = gemm.Selector(tmp_path, never)  # a new process: from the file, nothing measured
    assert choose(again) == gemm.ONEDNN and choose(again, M=64) == gemm.ONEDNN
    first.path.write_text("{not json")
    corrupt = gemm.Selector(tmp_path, fake_timer({}))
    assert corrupt.load() == {} and choose(corrupt) == gemm.MKL
    assert json.loads(first.path.read_text())["choices"]  # rewritten whole
    other = json.loads(first.path.read_text())
    other["machine"]["cpu"] = "another CPU"
    first.path.write_text(json.dumps(other))
    assert gemm.Selector(tmp_path).load() == {}


def test_an_unwritable_cache_directory_is_tolerated(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    selector = gemm.Selector(blocker / "cache", fake_timer({}))  # a directory under a file: cannot be made
    assert choose(selector) == gemm.MKL and choose(selector) == gemm.MKL
    assert not (blocker / "cache").exists()


def test_the_default_cache_is_the_users_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(gemm.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gemm.default_cache_dir() == tmp_path / "xdg" / "iclbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gemm.default_cache_dir() == tmp_path / "home" / ".cache" / "iclbench"
    monkeypatch.setenv(gemm.CACHE_ENV, str(tmp_path / "mine"))
    assert gemm.Selector().path.parent == tmp_path / "mine"


def test_models_keep_nn_linear_and_their_parameter_names():
    model = GPT(GPTOptions(n_layers=1, d_model=16, n_heads=2, d_mlp=32), 2, 1, 8)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear) and isinstance(model.unembed, gemm.Linear)
    assert {"embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.0.bias", "blocks.0.mlp.2.weight",
            "unembed.bias"} <= set(model.state_dict())


def train(steps=20, seed=0):
    task = get_registry().task("affine")(None)
    o = TrainOptions(steps=steps, batch_size=16, lr=3e-3, grad_clip=1.0)
    torch.manual_seed(seed)
    model = GPT(GPTOptions(n_layers=1, d_model=32, n_heads=4, d_mlp=64), task.d_in, task.d_out, task.context_len)
    opt, gen, norm = make_optimizer(model, o), torch.Generator().manual_seed(seed), task.normalizer("cpu")
    return [train_step(model, opt, task.sample(o.batch_size, gen), norm, o.lr, o).item() for _ in range(steps)]


def test_gpt1l_trains_to_the_same_losses_on_either_path(path):
    path("mkl")
    mkl = train()
    path("onednn")
    onednn = train()
    assert sum(mkl[-5:]) < sum(mkl[:5])  # it learns
    assert torch.allclose(torch.tensor(onednn), torch.tensor(mkl), rtol=1e-3, atol=1e-5), (mkl, onednn)


def test_stacked_seeds_still_train_with_onednn_forced(path):
    path("onednn")  # the vmapped stacked forward falls back to F.linear; each separate run takes oneDNN
    task = get_registry().task("linrec")(None)
    o = TrainOptions(steps=3, batch_size=8, lr=3e-3, grad_clip=0.05)
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(GPT(GPTOptions(n_layers=1, d_model=32, n_heads=4, d_mlp=64), 1, 1, task.context_len))
    separate = [copy.deepcopy(m) for m in models]
    stacked, opts = StackedSeeds(models, o), [make_optimizer(m, o) for m in separate]
    gens, norm = [torch.Generator().manual_seed(s) for s in range(2)], task.normalizer("cpu")
    for step in range(3):
        batches = [task.sample(o.batch_size, g) for g in gens]
        scored = mask_index(batches[0].mask)
        together = stacked.step(batches, norm, [1e-3] * len(batches), scored)
        alone = [train_step(m, opt, b, norm, 1e-3, o, scored) for m, opt, b in zip(separate, opts, batches)]
        assert torch.allclose(together, torch.stack(alone), rtol=1e-5, atol=1e-6)
