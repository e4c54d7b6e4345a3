"""Differentiable sorting networks (Petersen et al.), applied as the pairwise updates they are.

``soft_sort`` returns the same values and soft permutation matrices as diffsort 0.2.0's
``DiffSortNet`` (the sorter NeCo pins), but it does not build each network layer as dense 0/1
matrices multiplied into the (N, n, n) permutation state. A layer of a sorting network is a set of
disjoint comparators; each one mixes two columns of the state with its relaxed swap weight, so a
layer costs O(N·n·k) instead of O(N·n²·k). The comparators of a layer are laid out as strided views
of a (padded) wire axis, so a layer is a handful of vectorised elementwise ops and no gathers.

Memory: autograd never sees the permutation state. Forward keeps only the comparator inputs of the
value path (N × Σk floats); backward recomputes the state in chunks of input rows and runs the
transposed network on the incoming gradient. Each row r of the state (where input r's mass sits)
evolves independently under the same comparator weights, so rows can be processed in any chunking.

Convention (as diffsort): ascending order, ``sorted = x @ P``; ``P[i, j]`` is the mass of input
element ``i`` at output rank ``j``. Half-precision inputs are sorted in float32 (the spec keeps the
sort and the log in float32), and the outputs are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from densebench.errors import ConfigError, choices_message

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")
_NETWORK_ALIASES = {"bitonic": "bitonic", "odd_even": "odd_even", "odd-even": "odd_even", "oddeven": "odd_even"}

#: Working-set budget (elements) of one chunk of state rows: forward keeps two state buffers per chunk,
#: backward also the per-layer differences. Chunks small enough to stay in cache run fastest on CPU
#: (measured with bench/sorting.py); on CUDA chunks are larger so that kernel launches stay few.
_CPU_CHUNK_ELEMENTS = 1 << 21
_CPU_BACKWARD_CHUNK_ELEMENTS = 1 << 23
_CUDA_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class _Layer:
    """One layer: ``groups`` blocks of 2m wires starting at ``offset``; wire a = offset+g·2m+i meets a+m.

    ``flip[g, i]``: the soft minimum goes to the upper wire (bitonic's descending half-blocks).
    ``active[g, i]``: both wires are real; comparators touching a padding wire are the identity.
    """

    offset: int
    m: int
    groups: int
    flip: tuple[tuple[bool, ...], ...]
    active: tuple[tuple[bool, ...], ...]


@dataclass(frozen=True)
class _Network:
    n: int
    width: int  # wires including the padding wires, which sit at the front (indices < width - n)
    layers: tuple[_Layer, ...]

    @property
    def pad(self) -> int:
        return self.width - self.n


@lru_cache(maxsize=64)
def _build_network(kind: str, n: int) -> _Network:
    """The comparator layout of diffsort's networks, in strided form.

    bitonic: pad to the next power of two W with padding wires in front; block b has b+1 layers with
    distances 2^b, ..., 1; the comparator whose lower wire a has ``(a // 2^(b+1))`` odd sends the
    minimum up. odd_even: n layers alternating pairs (0,1),(2,3)... and (1,2),(3,4)...; wires left
    out of a layer keep their value, as diffsort's 0.5/0.5 pass-through comparators do.
    """
    layers: list[_Layer] = []
    if kind == "bitonic":
        blocks = math.ceil(math.log2(n)) if n > 1 else 0
        width = 2 ** blocks
        pad = width - n
        for block in range(blocks):
            for step in range(block + 1):
                m = 2 ** (block - step)
                groups = width // (2 * m)
                flip, active = [], []
                for g in range(groups):
                    lows = [g * 2 * m + i for i in range(m)]
                    flip.append(tuple((a // 2 ** (block + 1)) % 2 == 1 for a in lows))
                    active.append(tuple(a >= pad and a + m >= pad for a in lows))
                layers.append(_Layer(0, m, groups, tuple(flip), tuple(active)))
        return _Network(n, width, tuple(layers))
    if kind == "odd_even":
        for t in range(n):
            offset = t % 2
            groups = (n - offset) // 2
            if groups:
                layers.append(_Layer(offset, 1, groups, ((False,),) * groups, ((True,),) * groups))
        return _Network(n, n, tuple(layers))
    raise ConfigError(choices_message("sorting network", kind, NETWORKS))


def _alpha(d: torch.Tensor, steepness: float, distribution: str, art_lambda: float) -> torch.Tensor:
    """Relaxed swap weight of a comparator from d = b - a (upper minus lower input), as diffsort computes it."""
    if distribution == "cauchy":
        return 1 / math.pi * torch.atan(steepness * d) + 0.5
    if distribution == "logistic":
        return torch.sigmoid(d * steepness)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * steepness / ((-d).abs() + 1.0e-10).pow(art_lambda))
    if distribution == "gaussian":
        return 0.5 + 0.5 * torch.erf(d / (1 / steepness) / math.sqrt(2))
    if distribution == "reciprocal":
        v = steepness * d
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "optimal":
        v = steepness * d
        return torch.clamp(v, -0.25, 0.25) + 0.5 + ((v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)) * (
            0.25 - 1 / 16 / (v.abs() + 1e-10))
    raise ConfigError(choices_message("sorting distribution", distribution, DISTRIBUTIONS))


class _Plan:
    """A network's masks on one device, shaped to broadcast against (groups, m, N) comparator tensors."""

    def __init__(self, net: _Network, device: torch.device):
        self.net = net
        self.flip = [torch.tensor(layer.flip, dtype=torch.bool, device=device).unsqueeze(-1) for layer in net.layers]
        self.active = [torch.tensor(layer.active, dtype=torch.bool, device=device).unsqueeze(-1)
                       for layer in net.layers]
        self.any_flip = [any(any(row) for row in layer.flip) for layer in net.layers]
        self.all_active = [all(all(row) for row in layer.active) for layer in net.layers]


_PLANS: dict[tuple[str, int, str], _Plan] = {}


def _plan(kind: str, n: int, device: torch.device) -> _Plan:
    key = (kind, n, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(_build_network(kind, n), device)
    return plan


def _pair_view(state: torch.Tensor, layer: _Layer, g0: int = 0, g1: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper wires of comparator blocks g0..g1 of a layer, as views (..., g, m, N) of a (..., W, N) state."""
    g1 = layer.groups if g1 is None else g1
    lead = state.shape[:-2]
    span = state.narrow(-2, layer.offset + g0 * 2 * layer.m, (g1 - g0) * 2 * layer.m)
    blocks = span.view(*lead, g1 - g0, 2, layer.m, state.shape[-1])
    return blocks.select(-3, 0), blocks.select(-3, 1)


def _weights_layer(plan: _Plan, i: int, d: torch.Tensor, steepness: float, distribution: str,
                   art_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's p (weight of a wire's own input in its output) and q (the other input's weight)."""
    alpha = _alpha(d, steepness, distribution, art_lambda)
    alpha_bar = 1 - alpha
    if plan.any_flip[i]:
        p = torch.where(plan.flip[i], alpha_bar, alpha)
        q = torch.where(plan.flip[i], alpha, alpha_bar)
    else:
        p, q = alpha, alpha_bar
    if not plan.all_active[i]:
        p = torch.where(plan.active[i], p, torch.ones_like(p))
        q = torch.where(plan.active[i], q, torch.zeros_like(q))
    return p, q


@dataclass(frozen=True)
class _Step:
    """What one layer does to a chunk of state rows: blocks g0..g1 meet the rows' support; the wires in
    ``carry`` are in the support but outside those blocks and pass through unchanged."""

    g0: int
    g1: int
    carry: tuple[tuple[int, int], ...]


@lru_cache(maxsize=4096)
def _schedule(kind: str, n: int, w_start: int, w_stop: int) -> tuple[_Step, ...]:
    """Which comparator blocks can touch the state rows that start on wires w_start..w_stop.

    Row r of the state is zero outside the wires its mass has reached. That support is an interval
    that only grows where a comparator block overlaps it; every other block only moves zeros, so it
    is skipped. In a bitonic network the early blocks (small 2m) keep the support narrow, which
    halves the work for chunks of neighbouring rows. In backward the same steps are exact for the
    gradient on the support, the only part the comparator weights' gradients read.
    """
    net = _build_network(kind, n)
    s0, s1 = w_start, w_stop
    steps = []
    for layer in net.layers:
        size = 2 * layer.m
        g0 = max(0, (s0 - layer.offset) // size)
        g1 = min(layer.groups, -((layer.offset - s1) // size))
        if g0 < g1:
            a0, a1 = layer.offset + g0 * size, layer.offset + g1 * size
            carry = tuple((u, v) for u, v in ((s0, min(s1, a0)), (max(s0, a1), s1)) if u < v)
            s0, s1 = min(s0, a0), max(s1, a1)
        else:
            g0 = g1 = 0
            carry = ((s0, s1),)
        steps.append(_Step(g0, g1, carry))
    return tuple(steps)


def _chunks(plan: _Plan, batch: int, device: torch.device, buffers_per_row: float, backward: bool = False):
    """Row chunks (in wire coordinates) aligned to powers of two, sized to a working-set budget."""
    if device.type == "cuda":
        budget = _CUDA_CHUNK_ELEMENTS
    else:
        budget = _CPU_BACKWARD_CHUNK_ELEMENTS if backward else _CPU_CHUNK_ELEMENTS
    net = plan.net
    rows = max(1, int(budget // max(1.0, buffers_per_row * net.width * batch)))
    size = 1 << (rows.bit_length() - 1)
    first = net.pad - net.pad % size
    for w in range(first, net.width, size):
        yield max(w, net.pad), min(w + size, net.width)


def _run(src: torch.Tensor, dst: torch.Tensor, plan: _Plan, steps: tuple[_Step, ...], ps: list[torch.Tensor],
         order, record: list | None = None, grads: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the layers in ``order`` to (rows, W, N) states, ping-ponging between two buffers.

    A comparator sends p·lo + (1-p)·hi to its lower wire and (1-p)·lo + p·hi to the upper one, as
    ``lerp``, which is exact for p in {0, 1} and keeps the relative precision of tiny non-negative
    entries (log P needs them). The 2x2 mix is symmetric, so the same loop runs the transposed
    network on gradients. ``record[i]`` receives lower-minus-upper of layer i's inputs; with
    ``grads = (totals, recorded)`` (backward, layers in reverse), ``totals[i]`` accumulates the sum over
    rows of (lo - hi) of the incoming gradient times ``recorded[i]``: the gradient of layer i's p.
    Returns (buffer holding the result, the other buffer).
    """
    for i in order:
        layer, step = plan.net.layers[i], steps[i]
        if step.g0 < step.g1:
            lo, hi = _pair_view(src, layer, step.g0, step.g1)
            out_lo, out_hi = _pair_view(dst, layer, step.g0, step.g1)
            p = ps[i][step.g0:step.g1]
            if record is not None:
                record[i] = lo - hi
            if grads is not None:
                total, recorded = grads
                contrib, recorded[i] = recorded[i], None
                contrib.mul_(lo - hi)
                total[i][step.g0:step.g1].add_(contrib.sum(0))
            torch.lerp(hi, lo, p, out=out_lo)
            torch.lerp(lo, hi, p, out=out_hi)
        for u, v in step.carry:
            dst[:, u:v].copy_(src[:, u:v])
        src, dst = dst, src
    return src, dst


class _SoftSort(torch.autograd.Function):
    """Autograd sees only the input and the two outputs; the permutation state is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, steepness: float, kind: str, distribution: str, art_lambda: float,
                need_perm: bool):
        batch, n = x.shape
        plan = _plan(kind, n, x.device)
        net = plan.net
        layers = range(len(net.layers))
        # Value path, wire-major (W, N). Padding wires hold zeros and only meet identity comparators.
        values = x.new_zeros(net.width, batch)
        values[net.pad:] = x.t()
        ds, ps = [], []
        for i in layers:
            lo, hi = _pair_view(values, net.layers[i])
            d = hi - lo
            p, q = _weights_layer(plan, i, d, steepness, distribution, art_lambda)
            new_lo, new_hi = p * lo + q * hi, q * lo + p * hi
            lo.copy_(new_lo)
            hi.copy_(new_hi)
            ds.append(d)
            ps.append(p)
        sorted_x = values[net.pad:].t().contiguous()

        perm = x.new_empty(0)
        if need_perm:
            perm = x.new_empty(batch, n, n)
            for w0, w1 in _chunks(plan, batch, x.device, 2.0):
                src = _initial_state(w0, w1, plan, batch, x.dtype, x.device)
                src, _ = _run(src, torch.zeros_like(src), plan, _schedule(kind, n, w0, w1), ps, layers)
                perm[:, w0 - net.pad:w1 - net.pad, :] = src[:, net.pad:, :].permute(2, 0, 1)

        ctx.save_for_backward(*ds)
        ctx.meta = (steepness, kind, distribution, art_lambda, batch, n, x.dtype, x.device)
        ctx.set_materialize_grads(False)
        return sorted_x, perm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sorted, grad_perm):
        steepness, kind, distribution, art_lambda, batch, n, dtype, device = ctx.meta
        ds = list(ctx.saved_tensors)
        plan = _plan(kind, n, device)
        net = plan.net
        layers = range(len(net.layers))
        pairs = [_weights_layer(plan, i, d, steepness, distribution, art_lambda) for i, d in enumerate(ds)]
        ps, qs = [p for p, _ in pairs], [q for _, q in pairs]
        # d loss / d p of every comparator, from the permutation path and the value path.
        gps = [torch.zeros_like(p) for p in ps]

        if grad_perm is not None and grad_perm.numel():
            for w0, w1 in _chunks(plan, batch, device, 2.0 + len(net.layers) / 2, backward=True):
                steps = _schedule(kind, n, w0, w1)
                diffs: list = [None] * len(net.layers)
                src = _initial_state(w0, w1, plan, batch, dtype, device)
                src, dst = _run(src, torch.zeros_like(src), plan, steps, ps, layers, record=diffs)
                # The recomputed final state is not needed: its buffer takes these rows' gradient.
                src[:, :net.pad].zero_()
                src[:, net.pad:] = grad_perm[:, w0 - net.pad:w1 - net.pad, :].permute(1, 2, 0)
                _run(src, dst, plan, steps, ps, reversed(layers), grads=(gps, diffs))

        grad_values = torch.zeros(net.width, batch, dtype=dtype, device=device)
        if grad_sorted is not None:
            grad_values[net.pad:] = grad_sorted.t()
        for i in reversed(layers):
            lo, hi = _pair_view(grad_values, net.layers[i])
            gps[i].sub_((lo - hi) * ds[i])  # the value path's own use of p; its inputs were lo - hi = -d
            new_lo, new_hi = ps[i] * lo + qs[i] * hi, qs[i] * lo + ps[i] * hi
            lo.copy_(new_lo)
            hi.copy_(new_hi)
            # p is alpha, or 1 - alpha where flipped; inactive comparators do not depend on the inputs.
            g_alpha = gps[i]
            if plan.any_flip[i]:
                g_alpha = torch.where(plan.flip[i], -g_alpha, g_alpha)
            if not plan.all_active[i]:
                g_alpha = torch.where(plan.active[i], g_alpha, torch.zeros_like(g_alpha))
            g_d = _alpha_grad(ds[i], g_alpha, steepness, distribution, art_lambda)
            hi.add_(g_d)
            lo.sub_(g_d)
        return grad_values[net.pad:].t(), None, None, None, None, None


def _initial_state(w0: int, w1: int, plan: _Plan, batch: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """(rows, W, N) state of the inputs on wires w0..w1 before the first layer: each sits on its own wire."""
    rows = w1 - w0
    state = torch.zeros(rows, plan.net.width, batch, dtype=dtype, device=device)
    state[torch.arange(rows, device=device), torch.arange(w0, w1, device=device)] = 1
    return state


def _alpha_grad(d: torch.Tensor, g_alpha: torch.Tensor, steepness: float, distribution: str,
                art_lambda: float) -> torch.Tensor:
    """g_alpha · dalpha/dd, exactly as autograd differentiates diffsort's expression."""
    if distribution == "cauchy":
        v = steepness * d
        return g_alpha * (steepness / math.pi) / (1 + v * v)
    with torch.enable_grad():
        leaf = d.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_alpha(leaf, steepness, distribution, art_lambda), leaf, g_alpha)
    return grad


def soft_sort(x: torch.Tensor, steepness: float, network: str = "bitonic", distribution: str = "cauchy",
              *, art_lambda: float = 0.25, return_permutation: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiably sort each row of ``x`` (N, n) ascending; return ``(sorted (N, n), P (N, n, n))``.

    Equal (up to float rounding) to ``diffsort.DiffSortNet(network, n, steepness=steepness,
    distribution=distribution)(x)``, with gradients, at a fraction of its time and memory (see
    bench/sorting.py). ``network`` is "bitonic" or "odd_even"; ``distribution`` is one of
    :data:`DISTRIBUTIONS` ("cauchy" is diffsort 0.2.0's default and what NeCo uses); ``art_lambda`` is
    used by "logistic_phi" only. With ``return_permutation=False`` only the sorted values are
    computed and P is an empty tensor.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"soft_sort expects a (N, n) tensor; got {shape}")
    kind = _NETWORK_ALIASES.get(network)
    if kind is None:
        raise ConfigError(choices_message("sorting network", network, NETWORKS))
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(choices_message("sorting distribution", distribution, DISTRIBUTIONS))
    steepness = float(steepness)
    if not steepness > 0 or not math.isfinite(steepness):
        raise ConfigError(f"sorting steepness must be a positive finite number; got {steepness}")
    if not x.is_floating_point():
        raise ConfigError(f"soft_sort expects a floating-point tensor; got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    batch, n = x.shape
    if n == 0:
        raise ConfigError("soft_sort cannot sort rows of length 0")
    if n == 1 or batch == 0:
        perm = torch.ones(batch, n, n, dtype=x.dtype, device=x.device) if n == 1 else x.new_zeros(0, n, n)
        return x.clone(), (perm if return_permutation else x.new_empty(0))
    sorted_x, perm = _SoftSort.apply(x.contiguous(), steepness, kind, distribution, float(art_lambda),
                                     bool(return_permutation))
    return sorted_x, perm
