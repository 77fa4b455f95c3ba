"""Hand-wired GPTs whose mechanism is known, and a ramp task they solve, for known-answer probe tests.

Ramp: x_t = x_0 + t*b, so x_{t+1} = 2 x_t - x_{t-1} exactly (t >= 1). The wired model computes it the way the
seed paper says a trained one does: a layer-0 head copies x_t to the output; a later layer refines it with a
head that adds x_t again and an *anti-copy* head that attends to the previous token and subtracts it.
Every other head, every MLP and the unused layers have zero weights, so the probes must find nothing there.

Residual layout (d_model 16, each value stored as a (+v, -v) pair so the LayerNorm mean is exactly 0):
dims 0/1 x_t, 2/3 a large constant C (makes every LayerNorm a fixed scale, linear to ~1e-5), 4-7 positional
cos/sin, 8/9 the output channel the read-out reads, 10-15 unused.
"""

import math
from dataclasses import dataclass

import torch

from iclbench import Task
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.task import Batch, uniform

C, P = 1000.0, 10.0
D, H, D_HEAD = 16, 2, 8
THETA = math.pi / 16
SHARPNESS = 3000.0  # attention logit scale: the intended key wins by >= 50 nats


@dataclass
class RampOptions:
    context_len: int = 8


class _WiredTask(Task):
    """What the test tasks share: scalar inputs and outputs unless they say otherwise, a context length option."""
    d_in = d_out = 1

    @property
    def context_len(self):
        return self.options.context_len


class RampTask(_WiredTask):
    name = "ramp"
    description = "arithmetic progressions x_t = x_0 + t b (test task)"
    Options = RampOptions
    score_from = 2

    def sample(self, n, generator, device="cpu"):
        T = self.options.context_len
        x0 = uniform((n,), -1, 1, generator, device)
        b = uniform((n,), -0.25, 0.25, generator, device)
        decoy = uniform((n,), -1, 1, generator, device)  # a latent nothing in the model depends on
        x = x0[:, None] + b[:, None] * torch.arange(T + 1, device=device)
        return Batch(x[:, :-1, None], x[:, 1:, None], torch.ones(T, dtype=torch.bool, device=device),
                     {"b": b, "x0": x0, "decoy": decoy, "x": x})

    def baselines(self):
        return {"copy_last": lambda batch: batch.inputs.clone(),
                "extrapolate": lambda batch: torch.cat([batch.inputs[:, :1], 2 * batch.inputs[:, 1:]
                                                        - batch.inputs[:, :-1]], 1)}


def _sigma():
    """Standard deviation of the residual's constant part: the scale every LayerNorm divides by."""
    return math.sqrt((2 * C ** 2 + 2 * P ** 2) / D + 1e-5)


def _wire_head(block, head, *, attend, write, read=0):
    """Head ``head`` attends to the ``attend`` token ("current" or "previous"), reads x (the value held in
    residual dims ``read``/``read + 1``), writes ``write * x`` into the output channel."""
    s = _sigma()
    qkv, out = block.attn.qkv.weight, block.attn.out.weight
    q, k, v = (slice(i * D + head * D_HEAD, i * D + (head + 1) * D_HEAD) for i in range(3))
    g = math.sqrt(SHARPNESS * math.sqrt(D_HEAD)) * s / P  # so that q.k / sqrt(d_head) = SHARPNESS cos(...)
    shift = THETA if attend == "previous" else 0.0  # rotate the query back one position
    cos_in, sin_in = torch.zeros(D), torch.zeros(D)
    cos_in[4], cos_in[5], sin_in[6], sin_in[7] = 0.5, -0.5, 0.5, -0.5  # reads (cos, sin) from the pairs
    k_rows = qkv[k.start:k.start + 2]
    k_rows[0], k_rows[1] = g * cos_in, g * sin_in
    q_rows = qkv[q.start:q.start + 2]  # R(-shift) (cos t, sin t) = (cos(t - shift), sin(t - shift))
    q_rows[0] = g * (math.cos(shift) * cos_in + math.sin(shift) * sin_in)
    q_rows[1] = g * (-math.sin(shift) * cos_in + math.cos(shift) * sin_in)
    qkv[v.start, read], qkv[v.start, read + 1] = s / 2, -s / 2  # v = x
    out[8, head * D_HEAD], out[9, head * D_HEAD] = write, -write


def _wire_similarity_head(block, head, strength):
    """Add ``strength * x_q * x_k`` to head ``head``'s score of key k for query q (negative: it looks away
    from similar values), on top of any positional pattern the head has."""
    s = _sigma()
    qkv = block.attn.qkv.weight
    q, k = (slice(i * D + head * D_HEAD, i * D + (head + 1) * D_HEAD) for i in range(2))
    g = math.sqrt(abs(strength) * math.sqrt(D_HEAD))
    row = 2  # rows 0/1 of the head's q and k may hold a positional pattern (_wire_head); this adds to it
    qkv[q.start + row, 0], qkv[q.start + row, 1] = g * s / 2, -g * s / 2  # q = g x
    sign = 1.0 if strength > 0 else -1.0
    qkv[k.start + row, 0], qkv[k.start + row, 1] = sign * g * s / 2, -sign * g * s / 2  # k = ±g x


@dataclass
class OppositeOptions:
    context_len: int = 8
    noise: float = 0.0


class OppositeTask(_WiredTask):
    """i.i.d. values x_t ~ U(-1, 1); the target is the earlier value most *opposite* to the current one,
    x_k with k = argmin_{k <= t} x_t·x_k (plus observation noise, sd ``noise``). A head attending by negative
    similarity, softmax(-c·x_q·x_k), computes it: the positive control for claim 2. ``bayes`` is the exact
    answer (the noise is unpredictable)."""

    name = "opposite"
    description = "retrieve the context value most opposite to the current one (test task)"
    Options = OppositeOptions
    score_from = 3

    def sample(self, n, generator, device="cpu"):
        T = self.options.context_len
        x = uniform((n, T), -1, 1, generator, device)
        answer = self.answer(x[..., None])
        noise = self.options.noise * torch.randn(answer.shape, generator=generator, device=device)
        return Batch(x[..., None], answer + noise, torch.ones(T, dtype=torch.bool, device=device), {"x": x})

    @staticmethod
    def answer(inputs):
        x = inputs[..., 0]
        T = x.shape[1]
        sim = x[:, :, None] * x[:, None, :]  # [B, q, k]
        sim = sim.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("inf"))
        return x.gather(1, sim.argmin(-1))[..., None]

    def normalizer(self, device="cpu"):
        return torch.tensor(1 / 3 + self.options.noise ** 2, device=device)  # E[y^2]: the prior mean is 0

    def baselines(self):
        return {"bayes": lambda batch: self.answer(batch.inputs)}


def _wire_value_head(block, head, write):
    """Head ``head`` writes ``write * x_k`` of the keys it attends to (its scores set elsewhere)."""
    s = _sigma()
    qkv, out = block.attn.qkv.weight, block.attn.out.weight
    v = 2 * D + head * D_HEAD
    qkv[v, 0], qkv[v, 1] = s / 2, -s / 2
    out[8, head * D_HEAD], out[9, head * D_HEAD] = write, -write


@torch.no_grad()
def opposite_gpt(strength=-200.0, layer=2, cancel=False, context_len=8) -> GPT:
    """The claim-2 positive control on :class:`OppositeTask`: layer 0 copies x_t, layer ``layer`` takes it
    back (a current-token head) and writes the value its *pure* negative-similarity head L{layer}H1
    (scores ``strength · x_q·x_k``, no positional pattern) retrieves. ``cancel=True`` (the fooling twin):
    layer 1 also holds two negative-similarity heads with one pattern and opposite writes, which cancel."""
    model = wired_gpt(refine_layer=None, context_len=context_len)
    block = model.blocks[layer]
    _wire_head(block, 0, attend="current", write=-1.0)
    _wire_similarity_head(block, 1, strength)
    _wire_value_head(block, 1, 1.0)
    if cancel:
        for h, sign in ((0, 1.0), (1, -1.0)):
            _wire_similarity_head(model.blocks[1], h, strength)
            _wire_value_head(model.blocks[1], h, sign)
    return model.eval()


class LeakTask(_WiredTask):
    """Affine recurrences (the seed task's rule) whose input at t also carries the answer y_{t+1} in a
    second channel, so a hand-wired layer can write the answer without computing it. Its answer correlates
    with copy-last (≈ 0.87 at the scored positions), so a test that calls every layer correlating with
    copy-last a copier is fooled by a layer that reads the leak."""

    name = "leak"
    description = "affine recurrences with the answer leaked in a second input channel (test task)"
    Options = RampOptions
    score_from = 3
    d_in, d_out = 2, 1

    def sample(self, n, generator, device="cpu"):
        from iclbench.tasks.affine import AffineOptions, AffineTask

        inner = AffineTask(AffineOptions(context_len=self.options.context_len)).sample(n, generator, device)
        return Batch(torch.cat([inner.inputs, inner.targets], -1), inner.targets, inner.mask, inner.latents)

    def normalizer(self, device="cpu"):
        from iclbench.tasks.affine import AffineOptions, AffineTask

        return AffineTask(AffineOptions(context_len=self.options.context_len)).normalizer(device)

    def baselines(self):
        return {"copy_last": lambda batch: batch.inputs[..., :1].clone(),
                "bayes": lambda batch: batch.inputs[..., 1:].clone()}


@torch.no_grad()
def wired_gpt(copy_layer=0, refine_layer=2, n_layers=3, context_len=8, predict_layer=None,
              similarity=None, leak_layer=None, d_in=1) -> GPT:
    """A GPT (the registered architecture, unchanged) with weights set by hand; see the module docstring.
    ``refine_layer=None`` leaves only the copy head. ``predict_layer=L``: instead of copying, layer L
    writes the answer 2 x_t - x_{t-1} itself (a current-token head and an anti-copy head; the "predict,
    don't copy" layer that correlates with copy-last without copying). ``similarity=(layer, head,
    strength)`` adds ``strength * x_q * x_k`` to that head's scores (on its own, a head that writes nothing;
    on the anti-copy head L2H1, a negative-similarity head that still attends to the previous token).
    ``leak_layer=L`` (for :class:`LeakTask`, two input channels): layer L's head 0 writes the leaked answer
    instead of copying."""
    d_in = 2 if leak_layer is not None else d_in  # d_in=2: inputs as LeakTask's (the second one unread)
    model = GPT(GPTOptions(n_layers=n_layers, d_model=D, n_heads=H, d_mlp=4), d_in, 1, context_len)
    for p in model.parameters():
        p.zero_()
    for norm in [model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
        norm.weight.fill_(1.0)
    model.embed.weight[0, 0], model.embed.weight[1, 0] = 1.0, -1.0
    model.embed.bias[2], model.embed.bias[3] = C, -C
    t = torch.arange(context_len)
    model.pos_embed.weight[:, 4], model.pos_embed.weight[:, 5] = P * torch.cos(THETA * t), -P * torch.cos(THETA * t)
    model.pos_embed.weight[:, 6], model.pos_embed.weight[:, 7] = P * torch.sin(THETA * t), -P * torch.sin(THETA * t)
    model.unembed.weight[0, 8], model.unembed.weight[0, 9] = _sigma() / 2, -_sigma() / 2
    if leak_layer is not None:
        model.embed.weight[10, 1], model.embed.weight[11, 1] = 1.0, -1.0
        _wire_head(model.blocks[leak_layer], 0, attend="current", write=1.0, read=10)
    elif predict_layer is not None:
        _wire_head(model.blocks[predict_layer], 0, attend="current", write=2.0)
        _wire_head(model.blocks[predict_layer], 1, attend="previous", write=-1.0)
    elif copy_layer is not None:
        _wire_head(model.blocks[copy_layer], 0, attend="current", write=1.0)  # the copy head
    if similarity is not None:
        _wire_similarity_head(model.blocks[similarity[0]], similarity[1], similarity[2])
    if refine_layer is not None:
        _wire_head(model.blocks[refine_layer], 0, attend="current", write=1.0)
        _wire_head(model.blocks[refine_layer], 1, attend="previous", write=-1.0)  # the anti-copy head
    return model.eval()
