"""A module's forward and backward replayed as CUDA graphs, one pair per input signature.

Why: at one slide per step a MIL training step is bound by the host, not the GPU. On the H100
machine every PyTorch op that launches a kernel costs 25-110 µs of host time, and 2DMamba-MIL's work
on its grid (the layers, pooling and head) launches ~100 kernels forward and backward
(benchmarks/RESULTS.md). A graph launches them all for the host cost of one.

Graphs fix shapes and addresses. So `CudaGraphCache` keeps a forward and a backward graph per input
signature (shapes, strides, dtypes, which inputs need gradients, the autocast state), captured the
`capture_after`-th time that signature is seen; the least-seen graph makes room when `max_graphs` are
kept. A call copies its inputs into the graph's static inputs, replays, and returns copies of the
outputs. The backward hands autograd a copy of the parameters' gradients, so gradient accumulation and
hooks such as DDP's work as in eager mode. Results are the eager ones: the same kernels run on the
same values. A forward that cannot be captured raises a `ConfigError` that names the way out.

The graphs of one cache share one memory pool. That is safe because at most one replayed forward of a
cache is waiting for its backward: until it runs (or its autograd graph is dropped), further calls
run eagerly. (`torch.cuda.make_graphed_callables` captures one fixed signature and replays again on a
second forward, so it serves neither grids that change shape nor two bags before one backward.)
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mambascope.errors import ConfigError


@dataclass(frozen=True)
class _Graphs:
    """One captured signature: the static tensors the two graphs read and write."""

    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    grad_outputs: tuple[Tensor, ...]
    input_grads: tuple[Tensor | None, ...]  # per input (None: it needs none)
    param_grads: Tensor  # flat: the gradients of the differentiable parameters, in order
    param_shapes: tuple[torch.Size | None, ...]  # None: unused by the forward
    returns_tuple: bool  # fn returned a tuple (else one tensor)


class _Token:
    """Alive while a replayed forward waits for its backward (held by that forward's autograd node)."""


def admit(seen: collections.Counter, cached: Iterable[Hashable], key: Hashable, max_graphs: int,
          capture_after: int) -> tuple[bool, Hashable | None]:
    """Whether to capture `key` now, and which cached key to drop for it (None: no eviction).

    A key is captured from its `capture_after`-th sighting (a shape seen once is not worth a capture:
    that costs about three eager calls); when `max_graphs` are kept, only in place of the least-seen
    one and only if `key` has been seen more often, so a stream of ever-new shapes cannot make every
    step a capture."""
    if max_graphs <= 0 or seen[key] < capture_after:
        return False, None
    cached = list(cached)
    if len(cached) < max_graphs:
        return True, None
    victim = min(cached, key=lambda k: seen[k])
    return (True, victim) if seen[key] > seen[victim] else (False, None)


def _signature(inputs: Sequence[Tensor], params: Sequence[Tensor]) -> tuple:
    return (tuple((t.shape, t.stride(), t.dtype, t.requires_grad) for t in inputs),
            tuple(p.requires_grad for p in params),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), inputs[0].device)


class CudaGraphCache:
    """`cache(module, fn, *inputs)` == `fn(*inputs)`, replayed from CUDA graphs where it can be; `fn`
    returns a tensor or a tuple of tensors.

    `module`: the owner of every parameter `fn` reads besides `inputs`, which `fn` reaches through the
    module's attributes (e.g. `fn` is one of its methods); their addresses must stay put (in-place
    optimizer updates do; moving the module drops the graphs). Eager whenever graphs
    cannot serve: CPU tensors, no gradient needed, `max_graphs` 0, inside another capture or a compile.
    """

    def __init__(self, max_graphs: int = 8, capture_after: int = 2):
        self.max_graphs, self.capture_after = max_graphs, capture_after
        self._graphs: dict[tuple, _Graphs] = {}
        self._seen: collections.Counter = collections.Counter()
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._param_addresses: tuple[int, ...] = ()
        self._waiting: Callable[[], _Token | None] = lambda: None

    def __getstate__(self) -> dict:
        """Copies and pickles (DDP spawn, deepcopy of a model) carry the settings, not the graphs."""
        return {"max_graphs": self.max_graphs, "capture_after": self.capture_after}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, module: nn.Module, fn: Callable[..., Tensor | tuple[Tensor, ...]],
                 *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        named = dict(module.named_parameters())
        params = list(named.values())
        if not self._can_replay(params, inputs):
            return fn(*inputs)
        addresses = tuple(p.data_ptr() for p in params)
        if addresses != self._param_addresses:  # parameters moved or replaced: the graphs read old memory
            self._graphs.clear()
            self._param_addresses = addresses
        key = _signature(inputs, params)
        trained = {name: p for name, p in named.items() if p.requires_grad}
        self._seen[key] += 1
        graphs = self._graphs.get(key)
        if graphs is None:
            capture, evict = admit(self._seen, self._graphs, key, self.max_graphs, self.capture_after)
            if not capture:
                return fn(*inputs)
            if evict is not None:
                del self._graphs[evict]
            try:
                graphs = self._graphs[key] = self._capture(module, fn, trained, inputs)
            except RuntimeError as error:
                # e.g. an op that waits on the GPU; CUDA's random-number state is then left mid-capture,
                # so the process cannot go on eagerly either
                raise ConfigError(f"a CUDA graph of this model could not be captured: {error}",
                                  hint="train it without CUDA graphs: --model-args '{\"cuda_graphs\": 0}' "
                                  "(from Python: cuda_graphs=0)") from error
        token = _Token()
        self._waiting = weakref.ref(token)
        outputs = _Replay.apply(graphs, token, len(inputs), *inputs, *trained.values())
        return outputs if graphs.returns_tuple else outputs[0]

    def _can_replay(self, params: Sequence[Tensor], inputs: Sequence[Tensor]) -> bool:
        return (self.max_graphs > 0 and torch.is_grad_enabled() and all(t.is_cuda for t in inputs)
                and any(t.requires_grad for t in (*inputs, *params))
                and self._waiting() is None
                and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling())

    def _capture(self, module: nn.Module, fn: Callable[..., Tensor | tuple[Tensor, ...]],
                 trained: dict[str, Tensor], inputs: Sequence[Tensor]) -> _Graphs:
        """The two graphs of `fn` on static copies of `inputs`, differentiated for those inputs that need
        gradients and for the `trained` parameters (by name in `module`).

        `fn` runs on aliases of the parameters (same memory, new autograd leaves): the autograd nodes of
        the parameters themselves may be held by an earlier step's graph, made on another stream, and
        the capture would then have to wait on that stream, which breaks it."""
        static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        aliases = {f"module.{name}": p.detach().requires_grad_() for name, p in trained.items()}
        bound = _Bound(module, fn)

        def fn_on_aliases(*args: Tensor) -> Tensor | tuple[Tensor, ...]:
            return torch.func.functional_call(bound, aliases, args)

        differentiable = [t for t in static if t.requires_grad] + list(aliases.values())
        num_input_grads = len(differentiable) - len(aliases)
        # the caller's autocast, without its cast cache (cached casts would outlive the capture)
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        if self._pool is None:
            # one side stream for every capture: the caching allocator hands a freed block only to the
            # stream that allocated it, so captures on fresh streams could not reuse each other's memory
            # in the shared pool, and it grew with every graph
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # one eager pass on the capture stream first: libraries set up per stream (cuBLAS
            # workspaces) and kernels are compiled outside the capture
            with autocast:
                warm = _as_tuple(fn_on_aliases(*static))
            torch.autograd.grad(warm, differentiable, [torch.ones_like(t) for t in warm], allow_unused=True)
            del warm
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # thread-local capture: a DataLoader's pinning thread may allocate meanwhile
            with torch.cuda.graph(forward, pool=self._pool, stream=stream, capture_error_mode="thread_local"), autocast:
                result = fn_on_aliases(*static)
                outputs = _as_tuple(result)
            grad_outputs = tuple(torch.empty_like(t) for t in outputs)
            with torch.cuda.graph(backward, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(outputs, differentiable, grad_outputs, allow_unused=True)
                param_grads = grads[num_input_grads:]
                # parameter gradients in one buffer, so one copy hands them out (they are small)
                flat = torch.cat([g.reshape(-1) for g in param_grads if g is not None])
        torch.cuda.current_stream().wait_stream(stream)
        input_grads = iter(grads[:num_input_grads])
        return _Graphs(forward, backward, static, tuple(t.detach() for t in outputs), grad_outputs,
                       tuple(next(input_grads) if t.requires_grad else None for t in static), flat,
                       tuple(g.shape if g is not None else None for g in param_grads),
                       returns_tuple=isinstance(result, tuple))


class _Bound(nn.Module):
    """`fn` as the forward of a module holding `module`, so `torch.func.functional_call` can run it on
    substitutes for `module`'s parameters."""

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor | tuple[Tensor, ...]]):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self.fn(*args)


def _as_tuple(result: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


class _Replay(torch.autograd.Function):
    """Autograd's view of one replay: inputs and differentiable parameters in, outputs out."""

    @staticmethod
    def forward(ctx, graphs: _Graphs, token: _Token, num_inputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        for static, given in zip(graphs.inputs, tensors[:num_inputs], strict=True):
            static.copy_(given)
        graphs.forward.replay()
        ctx.graphs, ctx.token = graphs, token
        ctx.leaves = tuple(t.requires_grad and t.grad_fn is None for t in tensors[:num_inputs])
        return tuple(t.clone() for t in graphs.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: Tensor) -> tuple:
        if ctx.token is None:
            raise RuntimeError("backward ran twice through a CUDA-graphed forward, whose saved state the "
                               "first backward used up; run that model with cuda_graphs=0 to keep the graph")
        graphs = ctx.graphs
        for static, given in zip(graphs.grad_outputs, grad_outputs, strict=True):
            static.copy_(given)
        graphs.backward.replay()
        ctx.token = None  # this forward's state is spent: the cache may replay again
        # The inputs' gradients are passed on as they are: autograd hands them to the inputs' producers
        # before anything replays again. A leaf input keeps its gradient as .grad, so it gets a copy, as
        # do the parameters (accumulated .grad and DDP's buckets outlive the next replay).
        input_grads = [g.clone() if g is not None and leaf else g for g, leaf in zip(graphs.input_grads, ctx.leaves,
                                                                                      strict=True)]
        sizes = [shape.numel() if shape is not None else 0 for shape in graphs.param_shapes]
        param_grads = [part.view(shape) if shape is not None else None
                       for part, shape in zip(graphs.param_grads.clone().split(sizes), graphs.param_shapes, strict=True)]
        return (None, None, None, *input_grads, *param_grads)
