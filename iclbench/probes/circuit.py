"""Circuit discovery: the smallest set of edges of the model's computational graph that, run on its own (every
other edge fed from a counterfactual sequence), recovers a target share of the model's performance.

**Graph.** Senders are the components that write into the residual stream: ``embed`` (read-in plus positions),
every head ``L{l}H{h}`` (its ``hook_z`` through its slice of the output projection) and every MLP ``L{l}MLP``.
Receivers are what reads the residual stream: each layer's attention ``L{l}ATTN`` (all heads of a layer read one
input through ``ln1``: receivers are aggregated per layer, not per head or per q/k/v), each MLP ``L{l}MLP`` and
the read-out ``out``. An edge ``u -> v`` joins every sender to every receiver downstream of it (the residual path
between them); positions are aggregated (an edge carries the sender's write at every position). The attention
output bias is a constant, the same in every run, so it is no node. A head is *in the circuit* when one of its
outgoing edges is.

**Patching an edge.** In a pre-LN model a receiver's input is the sum of the upstream senders' outputs (plus the
constant biases). Removing the edge ``u -> v`` feeds ``v`` the input ``clean input − a_u + a*_u``, where ``a_u`` is
``u``'s output in this (patched) run and ``a*_u`` its output on the counterfactual; other receivers still see the
clean ``a_u``. The pruned model is actually run this way (through the hook points ``blocks.{l}.hook_resid_pre``,
``hook_resid_mid`` and the last ``hook_resid_post``, which are replaced by each receiver's own input).

**Counterfactual.** A fresh batch of the task: the same positions of other sequences with another rule (other
latents, other inputs). The targets stay the clean ones, so a corrupted edge costs what the model loses by
reading another sequence's information through it. Removing every edge is exactly running the model on the
counterfactual sequences.

**Scores** (edge attribution patching, Syed et al. 2023): ``score(u -> v) = (a*_u − a_u) · dM/d(input of v)``,
summed over positions and sequences, ``M`` the task's normalized squared error over the scored positions (its
excess over the Bayes limit differs from it by a constant, so the gradients are the same). Positive: corrupting
the edge raises the error. By default the gradient is averaged along the straight path from the counterfactual
inputs to the clean ones (``ig_steps`` midpoints, EAP-IG, Hanna et al. 2024): a trained model sits at a minimum
of the squared error, where the plain gradient (``ig_steps = 0``) is zero or noise.

**Pruning.** Edges are ranked by ``|score|``; a prefix whose faithfulness reaches ``target`` is kept (its size
doubled until it does, then bisected: the smallest such prefix where faithfulness grows with the prefix), then
edges are dropped one by one (smallest ``|score|`` first) and in *cancelling pairs* (opposite scores that nearly
sum to zero: two components whose writes cancel, each large on its own) while faithfulness stays at the target.
Every faithfulness is from running the pruned model. A redundant pair (two routes that each suffice, e.g. a
backup head that writes what a primary head did not) keeps one route, the one the ranking and the elimination
order settle on; the other is left out, so two seeds can differ by which route they keep (:func:`faithfulness`
runs any edge set, to check an alternative). Scores only order the search; they can mislead (a backup cancels
the gradient into the primary's input on the joint path), which is why every decision is a run.

On the wired ramp model (tests/wired.py) the smallest circuit at 0.9 is the copy path (embed -> L0ATTN,
L0H0 -> out: 97 % of the gap to a resampled ramp); the planted refinement (embed -> L2ATTN, L2H0/L2H1 -> out)
joins it at targets above ~0.975.

**Cost.** One forward and backward pass of ``ig_steps × n_sequences`` sequences for the scores, then one
forward pass of ``n_sequences`` per tried edge set: ~2 log2(k) for the prefix, k singles, the cancelling pairs,
``RANDOM_SETS`` random sets (k: the circuit's size). Edges grow with depth² (gpt3l 64, gpt6l 217, gpt12l 1417).

**Faithfulness** ``(E_corrupt − E_pruned) / (E_corrupt − E_full)`` of the mean error over the probe sequences (the
denominator floored at ``EXCESS_FLOOR``), with a bootstrap interval over sequences. It is compared with random
edge sets of the same size (paired over sequences). A model that has not learned its task (its error's excess
over the reference, as a share of the prior mean's, not clearly below ``NOT_LEARNED_ABOVE``) has no circuit.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult
from iclbench.evaluate import NOT_LEARNED_ABOVE, learned_label

from .common import clean, has_mlp, head_writes, probe_batch, reference_error, scored_positions, sq_error
from .stats import EXCESS_FLOOR, NA, estimate, ratio, resample_weights, seed_ci, verdict

#: faithfulness the pruned circuit must reach
TARGET = 0.9
#: integrated-gradient steps for the scores (0: the plain gradient at the clean run)
IG_STEPS = 5
#: random edge sets of the circuit's size the faithfulness is compared with
RANDOM_SETS = 16
#: two edges are tried as a cancelling pair when their scores have opposite signs and |s_a + s_b| is at most
#: this fraction of the larger |s|
CANCEL = 0.5
MAX_PAIRS = 200
#: sequences per batched forward pass (masks x sequences)
CHUNK = 4096


class Graph:
    """Senders, receivers and edges of a GPT with TransformerLens hook names (see the module docstring)."""

    def __init__(self, model):
        self.n_layers, self.n_heads = model.n_layers, model.n_heads
        self.mlp = [has_mlp(model, l) for l in range(self.n_layers)]
        self.senders, self.receivers, self.edges = ["embed"], [], []
        for l in range(self.n_layers):
            self._receive(f"L{l}ATTN")
            self.senders += [f"L{l}H{h}" for h in range(self.n_heads)]
            if self.mlp[l]:
                self._receive(f"L{l}MLP")
                self.senders.append(f"L{l}MLP")
        self._receive("out")
        self.index = {e: i for i, e in enumerate(self.edges)}

    def _receive(self, receiver):
        self.receivers.append(receiver)
        self.edges += [(u, receiver) for u in self.senders]

    def into(self, receiver):
        return [(i, u) for i, (u, v) in enumerate(self.edges) if v == receiver]


def edge_forward(model, graph: Graph, inputs, keep=None, corrupt=None, perturb=None, acts=None):
    """Run ``model`` on ``inputs`` with every receiver fed the sum of its senders' outputs; where ``keep[k, e]``
    is 0 the edge ``e`` carries the counterfactual output ``corrupt[u]`` instead (``keep [K, E]``: ``inputs``
    holds K copies of ``n`` sequences, copy k run with mask k). ``perturb[receiver]`` is added to that
    receiver's input (for gradients); ``acts``, if given, collects the senders' outputs."""
    acts = {} if acts is None else acts
    state = {}
    drop = None if keep is None else 1 - keep.to(inputs.dtype)
    L = graph.n_layers

    def receive(name):
        def hook(x, hook):
            if "R" not in state:  # the first receiver: the embedding is complete
                state["R"] = acts["embed"] = state.pop("embed") + state.pop("pos")
            r = acts["->" + name] = state["R"]  # the clean input: the sum of this run's senders (and biases)
            if keep is not None:
                # input = clean − Σ dropped (a_u − a*_u) = counterfactual input + Σ kept (a_u − a*_u): whichever
                # sum has fewer terms
                into = graph.into(name)
                dropped = [(e, u) for e, u in into if bool(drop[:, e].any())]
                kept = [(e, u) for e, u in into if bool(keep[:, e].any())]
                sign, terms = (-1, dropped) if len(dropped) <= len(kept) else (1, kept)
                K = keep.shape[0]
                base = corrupt["->" + name]
                r = r.view(K, *base.shape) if sign < 0 else base.expand(K, *base.shape)
                for e, u in terms:
                    w = (drop if sign < 0 else keep)[:, e].view(K, 1, 1, 1)
                    r = r + sign * w * (acts[u].view(r.shape) - corrupt[u])
                r = r.reshape(-1, *r.shape[2:])
            return r + perturb[name] if perturb is not None else r
        return hook

    def save(key):
        def hook(x, hook):
            state[key] = x
        return hook

    def heads(l):
        def hook(z, hook):
            w = head_writes(model, z, l)
            for h in range(graph.n_heads):
                acts[f"L{l}H{h}"] = w[:, :, h]
        return hook

    def add(name=None):
        def hook(x, hook):
            state["R"] = state["R"] + x
            if name:
                acts[name] = x
        return hook

    hooks = [("hook_embed", save("embed")), ("hook_pos_embed", save("pos"))]
    for l in range(L):
        hooks += [(f"blocks.{l}.hook_resid_pre", receive(f"L{l}ATTN")), (f"blocks.{l}.attn.hook_z", heads(l)),
                  (f"blocks.{l}.hook_attn_out", add())]
        if graph.mlp[l]:
            hooks += [(f"blocks.{l}.hook_resid_mid", receive(f"L{l}MLP")),
                      (f"blocks.{l}.hook_mlp_out", add(f"L{l}MLP"))]
    hooks.append((f"blocks.{L - 1}.hook_resid_post", receive("out")))
    return model.run_with_hooks(inputs, hooks)


class Setup:
    """One probe sample: clean and counterfactual batches, their sender outputs, per-sequence errors."""

    def __init__(self, model, task, graph, clean_batch, corrupt_batch):
        self.model, self.task, self.graph = model, task, graph
        self.clean, self.corrupt = clean_batch, corrupt_batch
        self.norm = task.normalizer(clean_batch.inputs.device)
        self.scored = scored_positions(task, clean_batch).to(clean_batch.inputs.device)
        self.acts, self.acts_x = {}, {}
        with torch.no_grad():
            self.full = self.error(edge_forward(model, graph, clean_batch.inputs, acts=self.acts))
            self.corrupted = self.error(edge_forward(model, graph, corrupt_batch.inputs, acts=self.acts_x))

    def error(self, pred) -> torch.Tensor:
        """``[K, n]`` error per sequence over the scored positions (pred holds K copies of the batch)."""
        n = len(self.clean)
        err = sq_error(pred.view(-1, n, *pred.shape[1:]), self.clean.targets, self.norm)
        return err[..., self.scored].mean(-1).double().cpu().squeeze(0)

    @torch.no_grad()
    def errors(self, keeps: torch.Tensor) -> torch.Tensor:
        """``[K, n]`` per-sequence error of the model run with each edge mask ``keeps [K, E]``."""
        n, out = len(self.clean), []
        step = max(1, CHUNK // n)
        for chunk in keeps.split(step):
            pred = edge_forward(self.model, self.graph, self.clean.inputs.repeat(len(chunk), 1, 1),
                                chunk.to(self.clean.inputs.device), self.acts_x)
            out.append(self.error(pred).view(len(chunk), n))
        return torch.cat(out)

    def faithfulness(self, errors: torch.Tensor) -> torch.Tensor:
        """Point faithfulness of each row of ``errors [K, n]``."""
        gap = max(float((self.corrupted - self.full).mean()), EXCESS_FLOOR)
        return (self.corrupted.mean() - errors.mean(-1)) / gap

    def mask(self, edges) -> torch.Tensor:
        m = torch.zeros(len(self.graph.edges))
        m[list(edges)] = 1
        return m


def edge_scores(setup: Setup, steps: int = IG_STEPS) -> torch.Tensor:
    """``[E]`` attribution score of every edge: ``(a*_u − a_u) · dM/d(input of v)``, the gradient averaged over
    ``steps`` points on the path from the counterfactual inputs to the clean ones (at the clean run if 0)."""
    model, graph, clean_b = setup.model, setup.graph, setup.clean
    alphas = [(i + 0.5) / steps for i in range(steps)] if steps else [1.0]
    x0, x1 = setup.corrupt.inputs, clean_b.inputs
    inputs = torch.cat([x0 + a * (x1 - x0) for a in alphas]) if steps else x1
    S, n = len(alphas), len(clean_b)
    d = setup.acts["embed"].shape[-1]
    with torch.enable_grad():
        perturb = {v: torch.zeros(S * n, x1.shape[1], d, device=x1.device, requires_grad=True)
                   for v in graph.receivers}
        pred = edge_forward(model, graph, inputs, perturb=perturb)
        err = sq_error(pred, clean_b.targets.repeat(S, 1, 1), setup.norm)[:, setup.scored].mean()
        grads = dict(zip(perturb, torch.autograd.grad(err, list(perturb.values()))))
    # err is the mean over S*n sequences: summing over the steps gives the step-averaged gradient of M
    g = {v: x.view(S, n, *x.shape[1:]).sum(0) for v, x in grads.items()}
    return torch.tensor([float(((setup.acts_x[u] - setup.acts[u]).float() * g[v]).sum()) for u, v in graph.edges])


def prune(setup: Setup, scores: torch.Tensor, target: float = TARGET) -> list[int]:
    """The edge set (indices): the smallest ``|score|``-ranked prefix reaching ``target``, then single edges
    and cancelling pairs removed while the pruned model still reaches it (see the module docstring)."""
    order = [int(i) for i in scores.abs().argsort(descending=True)]

    def reaches(edges) -> bool:
        return bool(setup.faithfulness(setup.errors(setup.mask(edges)[None]))[0] >= target)

    lo, hi = 0, 1  # the prefix size: doubled until it reaches the target, then bisected
    while hi < len(order) and not reaches(order[:hi]):
        lo, hi = hi, min(2 * hi, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(order[:mid]) else (mid, hi)
    keep = order[:hi]

    def singles(kept):
        for e in sorted(kept, key=lambda i: abs(float(scores[i]))):
            if len(kept) > 1 and reaches([i for i in kept if i != e]):
                kept = [i for i in kept if i != e]
        return kept

    keep = singles(keep)
    s = scores.tolist()
    pairs = [(a, b) for a, b in itertools.combinations(keep, 2)
             if s[a] * s[b] < 0 and abs(s[a] + s[b]) <= CANCEL * max(abs(s[a]), abs(s[b]))]
    pairs = sorted(pairs, key=lambda p: abs(s[p[0]] + s[p[1]]) / max(abs(s[p[0]]), abs(s[p[1]])))[:MAX_PAIRS]
    removed = False
    for a, b in pairs:
        if a in keep and b in keep and len(keep) > 2 and reaches([i for i in keep if i not in (a, b)]):
            keep = [i for i in keep if i not in (a, b)]
            removed = True
    return singles(keep) if removed else keep


def faithfulness(model, task, clean_batch, corrupt_batch, edges) -> float:
    """Faithfulness of the edge set ``edges`` (``(sender, receiver)`` names) on one sample, by running it."""
    setup = Setup(model, task, Graph(model), clean_batch, corrupt_batch)
    return float(setup.faithfulness(setup.errors(setup.mask([setup.graph.index[tuple(e)] for e in edges])[None]))[0])


def circuit(model, task, generator, device, n: int, target: float = TARGET, steps: int = IG_STEPS,
            random_sets: int = RANDOM_SETS) -> tuple[dict, pd.DataFrame]:
    """The probe's summary and per-edge table (see the module docstring)."""
    graph = Graph(model)
    clean_b, corrupt_b = probe_batch(task, n, generator, device), probe_batch(task, n, generator, device)
    setup = Setup(model, task, graph, clean_b, corrupt_b)
    weights = resample_weights(n, generator)
    boot = lambda x: (weights @ x.double()) / weights.sum(1)  # noqa: E731
    ref, ref_name = reference_error(task, clean_b)
    ref = ref[:, setup.scored].mean(-1).double().cpu()
    # the share of the prior mean's reducible error (normalized error 1) the model leaves
    relative = ratio(setup.full - ref, 1 - ref, boot)
    learned = learned_label(*relative["ci"]) if None not in relative["ci"] else NA
    summary = {"learned": learned, "relative_excess": relative, "reference": ref_name,
               "model_error": estimate(float(setup.full.mean()), boot(setup.full)),
               "corrupted_error": estimate(float(setup.corrupted.mean()), boot(setup.corrupted)),
               "excess_over_reference": estimate(float((setup.full - ref).mean()), boot(setup.full - ref)),
               "graph": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "mlp": graph.mlp,
                         "senders": len(graph.senders), "receivers": graph.receivers, "edges": len(graph.edges)},
               "method": {"scores": f"edge attribution patching, {steps} integrated-gradient steps" if steps
                          else "edge attribution patching (gradient at the clean run)",
                          "counterfactual": "a fresh batch of the task (other rule, other inputs), same positions",
                          "receivers": "per layer (L{l}ATTN: the input all heads of layer l read), MLPs, out",
                          "target": target}}
    empty = pd.DataFrame(columns=["sender", "receiver", "score", "rank", "in_circuit"])
    if relative["ci"][1] is None or relative["ci"][1] >= NOT_LEARNED_ABOVE:
        summary.update(edges=[], faithfulness=None, edge_fraction=None, circuit="not learned",
                       note="the model has not learned its task (relative excess over the reference not clearly "
                            f"below {NOT_LEARNED_ABOVE}): no circuit")
        return summary, empty
    scores = edge_scores(setup, steps)
    kept = prune(setup, scores, target)
    err = setup.errors(setup.mask(kept)[None])[0]
    f = ratio(setup.corrupted - err, setup.corrupted - setup.full, boot)
    f_boot = boot(setup.corrupted - err) / boot(setup.corrupted - setup.full).clamp_min(EXCESS_FLOOR)
    E = len(graph.edges)
    draws = torch.stack([setup.mask(torch.randperm(E, generator=generator)[:len(kept)].tolist())
                         for _ in range(random_sets)])
    rand_err = setup.errors(draws)  # [R, n]
    rand_f = setup.faithfulness(rand_err)
    rand_boot = torch.stack([boot(setup.corrupted - e) for e in rand_err]).mean(0) \
        / boot(setup.corrupted - setup.full).clamp_min(EXCESS_FLOOR)
    lo, hi = torch.quantile(rand_f, torch.tensor([0.025, 0.975], dtype=rand_f.dtype)).tolist()
    difference = estimate(float(f["mean"] - rand_f.mean()), f_boot - rand_boot)
    edges = sorted((graph.edges[i] for i in kept), key=lambda e: -abs(float(scores[graph.index[e]])))
    nodes = sorted({x for e in edges for x in e}, key=_node_order)
    heads = [x for x in nodes if _is_head(x)]
    by_layer: dict[str, list[str]] = {}
    for h in heads:
        by_layer.setdefault(h[1:h.index("H")], []).append(h[h.index("H"):])
    summary.update(
        circuit="found", edges=[list(e) for e in edges], faithfulness=f,
        reaches_target=verdict(f["ci"], target), edge_fraction=clean(len(kept) / E), n_edges=len(kept),
        nodes=nodes, heads=heads, heads_by_layer=by_layer,
        edge_scores={f"{u}->{v}": clean(scores[graph.index[(u, v)]]) for u, v in edges},
        random_faithfulness={"mean": clean(rand_f.mean()), "ci": [clean(lo), clean(hi)], "sets": random_sets},
        vs_random={"difference": difference, "verdict": verdict(difference["ci"], 0.0)},
        note=f"smallest |score|-ranked edge set whose pruned model (other edges from the counterfactual) recovers "
             f"{target} of the full model's error gap to the counterfactual; faithfulness interval over sequences")
    rank = {int(e): r for r, e in enumerate(scores.abs().argsort(descending=True))}
    table = pd.DataFrame([{"sender": u, "receiver": v, "score": float(scores[i]), "rank": rank[i],
                           "in_circuit": i in set(kept)} for i, (u, v) in enumerate(graph.edges)])
    return summary, table


def _is_head(node: str) -> bool:
    return node.startswith("L") and "H" in node


def _node_order(node: str):
    """embed, then layer by layer (heads, attention input, MLP), then out."""
    if node == "embed":
        return (-1, 0, 0)
    if node == "out":
        return (math.inf, 0, 0)
    layer = int(node[1:].split("H")[0].split("A")[0].split("M")[0])
    if _is_head(node):
        return (layer, 1, int(node[node.index("H") + 1:]))
    return (layer, 0 if node.endswith("ATTN") else 2, 0)


class Circuit(Probe):
    name = "circuit"
    description = ("automatic circuit discovery: edge attribution patching against a resampled counterfactual, "
                   "pruned to the smallest edge set whose run recovers the target faithfulness")
    n_sequences = 256
    #: faithfulness the circuit must reach, and the integrated-gradient steps of the scores
    target = TARGET
    ig_steps = IG_STEPS
    requires_hooks = ("hook_embed", "hook_pos_embed", "blocks.{layer}.hook_resid_pre", "blocks.{layer}.attn.hook_z",
                      "blocks.{layer}.hook_attn_out", "blocks.{layer}.hook_resid_post")
    requires_attributes = ("n_heads", "head_write_weights")

    def run(self, model, task, generator, device):
        summary, table = circuit(model, task, generator, device, self.n_sequences, self.target, self.ig_steps)
        return ProbeResult(table, summary)

    @classmethod
    def figures(cls, table, summary, run):
        if summary.get("circuit") != "found":
            return []
        return [ProbeFigure(cls.name, circuit_figure(summary),
                            f"The circuit: {len(summary['edges'])} edges ({summary['edge_fraction']:.0%} of the graph), faithfulness "
                            f"{summary['faithfulness']['mean']:.2f}; layers left to right, edge width by |score|.")]

    @classmethod
    def tracker_summary(cls, summary):
        if summary.get("circuit") != "found":
            return {"circuit": str(summary.get("circuit"))}
        return {"faithfulness": summary["faithfulness"]["mean"], "edge_fraction": summary["edge_fraction"],
                "heads": " ".join(summary["heads"])}

    @classmethod
    def terminal_lines(cls, summary):
        if summary.get("circuit") != "found":
            return [f"circuit: {summary.get('circuit')}"]
        f = summary["faithfulness"]
        return [f"circuit: {len(summary['edges'])} edges ({summary['edge_fraction']:.0%} of the graph), faithfulness {f['mean']:.3g} "
                f"[{f['ci'][0]:.3g}, {f['ci'][1]:.3g}]; heads {' '.join(summary['heads']) or 'none'}"]

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame:
        """One row per (task, model): how many seeds learned and have a circuit, the mean Jaccard overlap of
        the circuits' edges and nodes over pairs of seeds (and of edges with heads pooled per layer: a head's
        index within its layer is arbitrary across seeds) (each seed's mean overlap with the others, a
        Student-t interval over seeds), faithfulness and edge fraction over seeds, and the heads in the
        circuit per layer with the seeds that hold them ("H0 3/3")."""
        rows = []
        for (task, model), group in runs.groupby(["task", "model"], sort=True):
            summaries = [s for s in group["summary"] if isinstance(s, dict)]
            found = [s for s in summaries if s.get("circuit") == "found"]
            row = {"task": task, "model": model, "seeds": len(summaries), "circuits": len(found),
                   "edges Jaccard": _seed_overlap([_edge_set(s) for s in found]),
                   "nodes Jaccard": _seed_overlap([set(s["nodes"]) for s in found]),
                   "edges Jaccard, heads pooled": _seed_overlap([_edge_set(s, pooled=True) for s in found]),
                   "faithfulness": _over_seeds([s["faithfulness"]["mean"] for s in found], bounded=False),
                   "edge fraction": _over_seeds([s["edge_fraction"] for s in found])}
            depth = max((s["graph"]["n_layers"] for s in found), default=0)
            for l in range(depth):
                counts = pd.Series([h for s in found for h in s["heads_by_layer"].get(str(l), [])]).value_counts()
                row[f"layer {l} heads"] = ", ".join(f"{h} {c}/{len(found)}" for h, c in counts.sort_index().items()) \
                    or "—"
            rows.append(row)
        return pd.DataFrame(rows).fillna("—")  # a shallower cell has no deeper layers


def _edge_set(summary, pooled: bool = False) -> set:
    """The circuit's edges; ``pooled``: heads named by layer only (``L1H*``), since which index a head gets
    within its layer is arbitrary across seeds."""
    pool = (lambda x: x[:x.index("H") + 1] + "*" if _is_head(x) else x) if pooled else (lambda x: x)  # noqa: E731
    return {(pool(u), pool(v)) for u, v in summary["edges"]}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _seed_overlap(sets: list[set]) -> str:
    """Mean pairwise Jaccard; the interval is Student-t over each seed's mean overlap with the others (seeds
    are the independent unit; those means are not independent, so it is a rough interval)."""
    if len(sets) < 2:
        return "—"
    per_seed = [sum(jaccard(a, b) for j, b in enumerate(sets) if j != i) / (len(sets) - 1) for i, a in enumerate(sets)]
    return _over_seeds(per_seed)


def _over_seeds(values, bounded: bool = True) -> str:
    """'mean [lo, hi]' with a Student-t interval over seeds, clipped to [0, 1] for a share (``bounded``)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    ci = seed_ci(values)
    if ci and bounded:
        ci = (max(0.0, ci[0]), min(1.0, ci[1]))
    return f"{mean:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (1 seed)")


def circuit_overlap(runs: pd.DataFrame) -> pd.DataFrame:
    """Overlap of circuits across cells (depths, tasks): for every two (task, model) cells, the mean Jaccard of
    edges, of nodes and of edges with heads pooled per layer over all pairs of their seeds' circuits, and the
    edges and heads that a majority of the seeds of both cells hold. ``runs`` as for
    :meth:`Circuit.cross_run_table`."""
    cells = {}
    for key, group in runs.groupby(["task", "model"], sort=True):
        found = [s for s in group["summary"] if isinstance(s, dict) and s.get("circuit") == "found"]
        if found:
            cells[f"{key[1]} on {key[0]}"] = found
    rows = []
    for (a, sa), (b, sb) in itertools.combinations(cells.items(), 2):
        pairs = [(x, y) for x in sa for y in sb]
        common = _majority(sa, _edge_set) & _majority(sb, _edge_set)
        heads = _majority(sa, lambda s: set(s["heads"])) & _majority(sb, lambda s: set(s["heads"]))
        rows.append({"cell a": a, "cell b": b,
                     "edges Jaccard": clean(sum(jaccard(_edge_set(x), _edge_set(y)) for x, y in pairs) / len(pairs)),
                     "nodes Jaccard": clean(sum(jaccard(set(x["nodes"]), set(y["nodes"])) for x, y in pairs)
                                            / len(pairs)),
                     "edges Jaccard, heads pooled": clean(sum(jaccard(_edge_set(x, True), _edge_set(y, True))
                                                              for x, y in pairs) / len(pairs)),
                     "shared edges": ", ".join(f"{u}->{v}" for u, v in sorted(common)) or "—",
                     "shared heads": " ".join(sorted(heads, key=_node_order)) or "—"})
    return pd.DataFrame(rows, columns=["cell a", "cell b", "edges Jaccard", "nodes Jaccard",
                                       "edges Jaccard, heads pooled", "shared edges", "shared heads"])


def _majority(summaries, items) -> set:
    counts: dict = {}
    for s in summaries:
        for x in items(s):
            counts[x] = counts.get(x, 0) + 1
    return {x for x, c in counts.items() if c > len(summaries) / 2}


def circuit_figure(summary: dict):
    """The circuit as a graph: embedding, layers left to right (per layer: its attention input on top, its heads
    in a column, its MLP), read-out; edge width by |score|, blue where corrupting the edge raises the error,
    red where it lowers it; gray lines join a layer's attention input to its heads in the circuit. A figure with
    a note when there is no circuit."""
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no global figure state

    g = summary.get("graph", {})
    L, H = g.get("n_layers", 0), max(g.get("n_heads", 1), 1)
    fig = Figure(figsize=(2 + 1.8 * L, 1.5 + 0.45 * H))
    ax = fig.subplots()
    ax.set_axis_off()
    if summary.get("circuit") != "found":
        ax.text(0.5, 0.5, f"no circuit: {summary.get('circuit', 'n/a')}", ha="center", va="center")
        return fig

    def place(node):  # columns: embed | per layer: attention input, heads, MLP | out; the attention input on top
        if node in ("embed", "out"):
            return (0.0 if node == "embed" else 3.0 * L + 1), (H - 1) / 2
        layer, kind, h = _node_order(node)
        return 3.0 * layer + 1 + kind, {0: -1.2, 1: h, 2: (H - 1) / 2}[kind]

    def arrow(u, v, lw, color, style="-|>"):
        ax.annotate("", place(v), place(u), arrowprops=dict(arrowstyle=style, lw=lw, color=color, alpha=0.7,
                                                            shrinkA=9, shrinkB=9, connectionstyle="arc3,rad=0.12"))

    scores = summary["edge_scores"]
    top = max((abs(v) for v in scores.values() if v is not None), default=1.0) or 1.0
    for u, v in summary["edges"]:
        s = scores.get(f"{u}->{v}") or 0.0
        arrow(u, v, 0.5 + 5 * abs(s) / top, "tab:blue" if s >= 0 else "tab:red")
    for node in summary["nodes"]:  # a head reads its layer's attention input (not an edge: drawn dotted)
        if _is_head(node) and f"{node[:node.index('H')]}ATTN" in summary["nodes"]:
            arrow(f"{node[:node.index('H')]}ATTN", node, 0.6, "tab:gray", "-")
    for node in summary["nodes"]:
        x, y = place(node)
        ax.text(x, y, node, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="tab:gray"))
    ax.set_xlim(-0.7, 3.0 * L + 1.7)
    ax.set_ylim(H - 0.3, -1.7)
    f = summary["faithfulness"]
    ax.set_title(f"circuit: {summary['n_edges']} edges ({summary['edge_fraction']:.0%}), faithfulness "
                 f"{f['mean']:.2f} [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]", fontsize=9)
    return fig
