"""CUDA-graph replay of mamba2d's layers and mambamil (`models.cuda_graphs`): the policy on any machine; on a
GPU, that replayed steps give the eager results bit for bit, in every way a training loop can call them."""

from __future__ import annotations

import collections
import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mambascope.models import create_model
from mambascope.models.cuda_graphs import CudaGraphCache, admit
from mambascope.models.mil.grid import patch_grid
from mil_helpers import IN_DIM, lattice_coords, small_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_admit_captures_from_the_second_sighting_and_evicts_only_less_seen_shapes():
    seen = collections.Counter({"a": 1})
    assert admit(seen, [], "a", max_graphs=2, capture_after=2) == (False, None)
    seen["a"] = 2
    assert admit(seen, [], "a", max_graphs=2, capture_after=2) == (True, None)
    assert admit(seen, ["a"], "a", max_graphs=0, capture_after=2) == (False, None)
    seen.update({"b": 5, "c": 3})
    # full: c (3 sightings) replaces a (2), but a newcomer seen as often as the least-seen graph waits
    assert admit(seen, ["a", "b"], "c", max_graphs=2, capture_after=2) == (True, "a")
    seen["d"] = 2
    assert admit(seen, ["a", "b"], "d", max_graphs=2, capture_after=2) == (False, None)


def test_cache_runs_eagerly_off_the_gpu_and_copies_carry_settings_only():
    cache = CudaGraphCache(max_graphs=3, capture_after=4)
    owner = _Scaler(3, "cpu")
    x = torch.randn(2, 3, requires_grad=True)
    out = cache(owner, lambda t: (t * owner.weight).sum(1), x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, owner.weight.detach().expand(2, 3))
    assert cache.num_graphs == 0
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert (clone.max_graphs, clone.capture_after, clone.num_graphs) == (3, 4, 0)
    model = small_model("mamba2d")
    assert copy.deepcopy(model).graphs.max_graphs == 8
    assert create_model("mamba2d", in_dim=IN_DIM, num_classes=2, cuda_graphs=0).graphs.max_graphs == 0


class _Scaler(torch.nn.Module):
    """A module with one weight vector, for caches around hand-written functions."""

    def __init__(self, size: int, device: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(size, device=device))


def _bags(shapes: list[int], seed: int = 0) -> list[tuple]:
    """(features, coords, grid on the GPU, label) per bag; `shapes` picks each bag's patch count."""
    rng = np.random.default_rng(seed)
    bags = []
    for i, n in enumerate(shapes):
        coords = torch.from_numpy(lattice_coords(rng, n))
        grid = patch_grid(coords, n, multiple=16).to("cuda")
        bags.append((torch.randn(n, IN_DIM, device="cuda"), coords, grid, torch.tensor([i % 3], device="cuda")))
    return bags


def _twins(depth: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same mamba2d twice, replaying from graphs and eager."""
    graphed = create_model("mamba2d", in_dim=IN_DIM, num_classes=3, dim=32, depth=depth, d_state=8, attn_dim=16,
                           dropout=0.0).cuda().train()
    eager = copy.deepcopy(graphed)
    eager.graphs.max_graphs = 0
    return graphed, eager


def _loss(model, bag) -> torch.Tensor:
    features, coords, grid, label = bag
    out = model(features, coords, grid=grid)
    return torch.nn.functional.cross_entropy(out.logits.unsqueeze(0), label) + out.scores.square().sum()


def _assert_same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name


def _assert_twins_train_alike(graphed: torch.nn.Module, eager: torch.nn.Module, step_losses: list) -> None:
    """One AdamW step of each twin per entry of `step_losses` (model -> loss): the losses and gradients
    are equal bit for bit at every step."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (graphed, eager)]
    for step, loss_of in enumerate(step_losses):
        losses = []
        for model, optimizer in zip((graphed, eager), optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), step
        _assert_same_grads(graphed, eager)


@gpu
def test_graphed_training_steps_equal_eager_ones_over_changing_grid_shapes():
    graphed, eager = _twins(depth=2)
    bags = _bags([300, 300, 90, 300, 90, 90, 300])
    assert (bags[0][2].height, bags[0][2].width) != (bags[2][2].height, bags[2][2].width)
    _assert_twins_train_alike(graphed, eager, [lambda model, bag=bag: _loss(model, bag) for bag in bags])
    # both shapes were captured on their second sighting (steps 1 and 4) and replayed since
    assert graphed.graphs.num_graphs == 2


@gpu
def test_graphed_layers_serve_accumulation_second_forwards_and_dropped_forwards():
    graphed, eager = _twins()
    bag, other = _bags([200, 200])
    for model in (graphed, eager):  # two sightings: the layer captures its graph
        _loss(model, bag).backward()
        _loss(model, other).backward()
    assert graphed.graphs.num_graphs == 1
    for model in (graphed, eager):
        model.zero_grad(set_to_none=True)
        # two bags forward before one backward: the second runs eagerly, both get their gradients
        (_loss(model, bag) + 2 * _loss(model, other)).backward()
        # accumulation into existing .grad, and a forward whose graph is dropped without a backward
        _loss(model, other).backward()
        _loss(model, bag)
        _loss(model, bag).backward()
    _assert_same_grads(graphed, eager)
    loss = _loss(graphed, bag)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through a CUDA-graphed forward"):
        loss.backward()


@gpu
def test_graphed_layers_under_bf16_autocast_and_after_a_move():
    graphed, eager = _twins()
    bag = _bags([250])[0]
    for _ in range(3):
        for model in (graphed, eager):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = _loss(model, bag)
            loss.backward()
        _assert_same_grads(graphed, eager)
    assert graphed.graphs.num_graphs == 1
    # parameters in new memory: the old graphs would read freed memory, so they are dropped
    graphed.cpu().cuda()
    eager.cpu().cuda()
    for _ in range(3):
        for model in (graphed, eager):
            model.zero_grad(set_to_none=True)
            _loss(model, bag).backward()
        _assert_same_grads(graphed, eager)
    assert graphed.graphs.num_graphs == 1


@gpu
def test_a_forward_that_cannot_be_captured_fails_with_the_way_out():
    """Run in its own process: a failed capture leaves CUDA's random-number state mid-capture."""
    script = """
import torch
from mambascope.errors import ConfigError
from mambascope.models.cuda_graphs import CudaGraphCache
cache = CudaGraphCache(capture_after=1)
owner = torch.nn.Linear(4, 4).cuda()
x = torch.randn(4, device="cuda", requires_grad=True)
try:
    cache(owner, lambda t: owner(t) * t.sum().item(), x)  # .item() waits on the GPU: not capturable
except ConfigError as error:
    print("hint:", error.hint)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "hint: train it without CUDA graphs: --model-args '{\"cuda_graphs\": 0}'" in result.stdout, result.stderr


@gpu
def test_a_leaf_input_keeps_its_own_gradient_across_replays():
    cache = CudaGraphCache(capture_after=1)
    owner = _Scaler(5, "cuda")
    x = torch.randn(3, 5, device="cuda", requires_grad=True)
    for step in range(1, 4):
        (cache(owner, lambda t: (t * owner.weight).tanh(), x) * step).sum().backward()
    weight = owner.weight
    assert cache.num_graphs == 1
    expected_x, expected_w = torch.zeros_like(x), torch.zeros_like(weight)
    for step in range(1, 4):
        slope = (1 - (x * weight).tanh().square()) * step
        expected_x += (slope * weight).detach()
        expected_w += (slope * x).sum(0).detach()
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(weight.grad, expected_w)


@gpu
def test_replays_draw_fresh_dropout_masks_and_evaluation_runs_eagerly():
    model = create_model("mamba2d", in_dim=IN_DIM, num_classes=3, dim=32, d_state=8, attn_dim=16,
                         dropout=0.5).cuda().train()
    bag = _bags([200])[0]
    logits = []
    for _ in range(4):
        # `out` of the step before is still alive while this one is captured: its autograd graph holds the
        # parameters' nodes, made on the default stream (the capture must not wait on them)
        out = model(bag[0], bag[1], grid=bag[2])
        out.logits.sum().backward()
        logits.append(out.logits.detach())
    assert model.graphs.num_graphs == 1
    # steps 3 and 4 replay the graph: each replay draws its own masks in the pooling's dropout
    assert not torch.equal(logits[2], logits[3])
    model.eval()
    with torch.no_grad():
        a = model(bag[0], bag[1], grid=bag[2])
        model.graphs.max_graphs = 0
        b = model(bag[0], bag[1], grid=bag[2])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.scores, b.scores)


def _mambamil_twins(bidirectional: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same mambamil twice, replaying from graphs and eager."""
    graphed = create_model("mambamil", in_dim=IN_DIM, num_classes=3, dim=32, depth=2, d_state=8, attn_dim=16,
                           reorder_rate=4, bidirectional=bidirectional, dropout=0.0).cuda().train()
    eager = copy.deepcopy(graphed)
    eager.graphs.capture_after = 10**9  # pads its bags as the graphed twin does, but never captures
    return graphed, eager


def _bag_loss(model, features, label) -> torch.Tensor:
    out = model(features)
    return torch.nn.functional.cross_entropy(out.logits.unsqueeze(0), label) + out.scores.square().sum()


@gpu
@pytest.mark.parametrize("bidirectional", [False, True])
def test_graphed_mambamil_steps_equal_eager_ones_over_changing_bag_lengths(bidirectional):
    """Bags are padded to ladder lengths (300 -> 512, 700 -> 768, 3000 -> 3072), one graph pair each;
    under bf16 autocast too."""
    graphed, eager = _mambamil_twins(bidirectional)

    def step_loss(step: int, n: int):
        features, label = torch.randn(n, IN_DIM, device="cuda"), torch.tensor([step % 3], device="cuda")

        def loss_of(model):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=step >= 7):
                return _bag_loss(model, features, label)
        return loss_of

    lengths = [300, 300, 700, 300, 700, 3000, 3000, 3000, 3000]
    _assert_twins_train_alike(graphed, eager, [step_loss(step, n) for step, n in enumerate(lengths)])
    # each captured at its second sighting: 512, 768, and 3072 in fp32 and again under autocast
    assert graphed.graphs.num_graphs == 4


@gpu
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mambamil_on_a_padded_bag_gives_the_unpadded_results_on_the_gpu(bidirectional):
    """The Triton scans walk the padding with Δ = 0 (`PADDING_DELTA`): results match the unpadded bag."""
    padded, tight = _mambamil_twins(bidirectional)
    tight.graph_length = lambda length, device: None
    features = torch.randn(1000, IN_DIM, device="cuda")
    outs = []
    for model in (padded, tight):
        out = model(features)
        (out.logits.sum() + out.scores.square().sum()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0].scores, outs[1].scores, rtol=1e-4, atol=1e-7)
    for (name, p), q in zip(padded.named_parameters(), tight.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
