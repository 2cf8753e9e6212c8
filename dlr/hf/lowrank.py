"""The factorized projection with an optional Duplicated Latent Residual (DLR).

    z = act(A x),  y = B z + s * Expand_K(z),  s = alpha / sqrt(K),  K = ceil(d_out / r)

Expand_K copies latent coordinate index[o] into output o. It is linear in z, so
Expand_K(z) = R z with R a fixed one-hot [d_out, r] matrix, and we compute the residual
through the effective up weight B + s R: no [tokens, d_out] expansion is ever built, and
the gradient w.r.t. B is unchanged. Folding writes B + s R into B for good.

How B + s R is built depends on what is cheap where (docs/benchmarks.md, "Training step"):
- bf16 autocast, eager: an out-of-place scatter, then autocast's cast, which low-rank pays
  anyway; the cast copy is what F.linear keeps for backward, so no memory is added, and
  autograd stays in C++ (small models on a GPU are bound by per-op host overhead).
- no autocast (fp32), eager: the same weight through `_RebuiltResidualUp`, which keeps B rather
  than a copy of B + s R for backward and rebuilds it there (the copy is B-sized per layer).
- torch.compile: a pointwise `where` over an index comparison, which inductor can fuse with
  the cast.

The reference layer's other knobs (nanguoyu/DLR `dlr/layers.py`) take one simpler path, the
`where` form in eager mode too, so the measured paths above stay exactly as they are for the
default layer:

    y = c (B + s R) act(A x) + b,   s = alpha / sqrt(K) (variance correction) or alpha,
                                    c = latent_alpha / r (fixed) or tanh(p) (trainable, p0 = 1)

- a trainable alpha (one scalar Parameter per residual layer) makes s a tensor;
- a latent scale c multiplies the up weight (the same as scaling z, and r x d_out rather
  than tokens x r multiplies);
- a bias b (zero-initialised, as LLaMA's optional projection biases).
Variance correction off, gelu/relu and the expand modes only change s, act or the index,
so they keep the measured paths. Folding writes c (B + s R) into B with the learned s and c
and drops the index, the alpha and the latent scale: zero extra parameters afterwards.

Latent fusion (`fuse_latents`, off by default): q/k/v, and gate/up, read the same input, so
their latents can come from one GEMM, act(x [A_q; A_k; A_v]^T), split into the three codes
(one dX and one dA GEMM in backward instead of three of each). A compute layout only: each
A stays its own Parameter, and transformers' attention/MLP forwards are kept as they are
(see `LatentGroup`).

This file is copied into saved model directories (HF remote code): torch only.
"""
from __future__ import annotations

import hashlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = PROJECTIONS[:4]
MLP_PROJECTIONS = PROJECTIONS[4:]
METHODS = ("full", "lowrank", "dlr")
ACTIVATIONS = ("silu", "identity", "gelu", "relu")
EXPAND_MODES = ("uniform", "random_reuse", "permuted")
SCOPES = ("all", "attn", "mlp")


def expansion_factor(d_out: int, rank: int) -> int:
    return math.ceil(d_out / rank)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (run seed, module name): the same in every process and reload."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def expand_index(d_out: int, rank: int, mode: str, seed: int, name: str) -> torch.Tensor:
    """Latent coordinate feeding each output.

    - `uniform`: contiguous duplication, truncated to d_out (output o reads latent o // K).
    - `random_reuse` (the reference's ablation): each output draws its latent uniformly
      with replacement, so multiplicities vary and a latent may feed no output; seeded from
      (seed, module name), e.g. "model.layers.0.self_attn.q_proj".
    - `permuted` (what `random_reuse` meant here before): the uniform index shuffled, so
      every latent keeps its uniform multiplicity; seeded as it always was, from
      (seed, "<layer>.<proj>"), so a rebuilt index equals the one saved with old weights.
    Always built on the CPU: it must exist even when the weights are on `meta`.
    """
    if mode == "random_reuse":
        gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name))
        return torch.randint(0, rank, (d_out,), generator=gen, device="cpu", dtype=torch.long)
    index = torch.arange(d_out, device="cpu") // expansion_factor(d_out, rank)
    if mode == "permuted":
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        index = index[torch.randperm(d_out, generator=gen, device="cpu")]
    return index


def cola_init_std(d_in: int, d_out: int, rank: int) -> float:
    """CoLA: A, B ~ N(0, std) so that B A has entries of std (d_in + d_out)^-1/2."""
    return rank**-0.25 * (d_in + d_out) ** -0.25


class _RebuiltResidualUp(torch.autograd.Function):
    """y = z (B + s R)^T keeping z and B, not an fp32 B + s R, for backward.

    Without autocast, F.linear(z, B.scatter_add(...)) would keep the new B-sized weight
    alive until backward in every layer; here backward rebuilds it. dL/dB = dL/d(B + s R).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, B: torch.Tensor, index_col: torch.Tensor, scale_col: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, B, index_col, scale_col)
        return F.linear(z, B.scatter_add(1, index_col, scale_col))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        z, B, index_col, scale_col = ctx.saved_tensors
        grad_z = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_y @ B.scatter_add(1, index_col, scale_col)
        if ctx.needs_input_grad[1]:
            grad_B = grad_y.reshape(-1, grad_y.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        return grad_z, grad_B, None, None


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    return z


class LatentGroup:
    """Sibling LowRankLinears that read one input (q/k/v, gate/up): their latents in one GEMM.

    A plain object (not a Module: parameter names, state dicts and wrapping stay as they are)
    shared by the siblings. While the parent (attention or MLP) runs its forward, the first
    sibling called with x computes act(x cat(A_i)^T) for all of them and keeps the others'
    slices; a sibling called with that same x takes its slice and drops it, and the last one
    closes the group. Outside the parent's forward (a sibling called alone), after the group
    was served, or with another input, a sibling computes its own latent, unfused. The
    parent's forward hook drops whatever is left, so no tensor outlives the parent's forward.
    The siblings share activation and input width; the latent does not depend on the other
    knobs (they act on the up weight and the output).
    """

    def __init__(self, members: list["LowRankLinear"], parent: nn.Module) -> None:
        self.members = tuple(members)
        self.activation = members[0].activation
        self.ranks = [m.rank for m in members]
        self.active = False
        self.source: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = [None] * len(members)
        for slot, m in enumerate(members):
            m._latent_group, m._latent_slot = self, slot
        self.hooks = (parent.register_forward_pre_hook(self._open), parent.register_forward_hook(self._close))

    def _open(self, module: nn.Module, args) -> None:
        self._close(module, args, None)
        self.active = True

    def _close(self, module: nn.Module, args, output) -> None:
        self.active, self.source = False, None
        self.pending = [None] * len(self.members)

    def latent(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.members[slot].latent(x)
        if self.source is not None and (self.source is not x or self.pending[slot] is None):
            # Another input (e.g. a wrapper's dropout) or a second call: the cache stays for
            # the siblings it was made for.
            return self.members[slot].latent(x)
        if self.source is not None:
            z = self.pending[slot]
            self.pending[slot] = None
            if all(p is None for p in self.pending):
                # Served: close now, not only in the forward hook. A non-reentrant checkpoint's
                # recompute stops once it has what backward needs, before the parent's hook runs.
                self.active, self.source = False, None
            return z
        # Concatenated per forward (r x d_in per sibling, small next to the activations), so
        # that each A stays one Parameter: the optimizer, FSDP2 shards and the fold see no change.
        weight = torch.cat([m.A for m in self.members])
        zs = list(activate(F.linear(x, weight), self.activation).split(self.ranks, dim=-1))
        z, zs[slot] = zs[slot], None
        self.source, self.pending = x, zs
        return z

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for m in self.members:
            m._latent_group = None
        self.pending = [None] * len(self.members)
        self.source = None


class LowRankLinear(nn.Module):
    """y = B act(A x) (+ s * Expand_K(act(A x)) while the DLR residual is unfolded).

    Keyword-only knobs (the reference layer's; all off by default):
    trainable_alpha_divisor: when set, alpha is a trainable scalar Parameter `dlr_alpha` (shape [1])
        (initialised to dlr_scale * divisor) and s = dlr_alpha / divisor (sqrt(K), or 1
        without variance correction).
    latent_scale: a fixed multiplier c of the latent (latent_alpha / r).
    trainable_latent_scale: c = tanh(latent_scale_raw), a Parameter initialised to 1.
    bias: an output bias (zero-initialised).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "silu",
        dlr_scale: float = 0.0,
        dlr_index: torch.Tensor | None = None,
        *,
        trainable_alpha_divisor: float | None = None,
        latent_scale: float | None = None,
        trainable_latent_scale: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.activation = activation
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.dlr_scale = float(dlr_scale)
        if dlr_index is not None:
            # Persistent: a random_reuse index must travel with the weights it was trained with.
            # On B's device: a model built under `with torch.device("cuda")` must not keep a
            # CPU index (expand_index builds it on the CPU so that `meta` builds still have it).
            self.register_buffer("dlr_index", dlr_index.to(device=self.B.device, dtype=torch.long), persistent=True)
        else:
            self.dlr_index = None
        self.alpha_divisor = None
        if trainable_alpha_divisor is not None and dlr_index is not None:
            self.alpha_divisor = float(trainable_alpha_divisor)
            # Shape [1], not a 0-d scalar: FSDP2's fully_shard refuses 0-d parameters.
            self.dlr_alpha = nn.Parameter(torch.full((1,), self.dlr_scale * self.alpha_divisor, device=self.B.device))
        if trainable_latent_scale and latent_scale is not None:
            raise ValueError("latent_scale (fixed) and trainable_latent_scale exclude each other")
        self.latent_scale = None if latent_scale is None else float(latent_scale)
        if trainable_latent_scale:
            self.latent_scale_raw = nn.Parameter(torch.ones(1, device=self.B.device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=self.B.device)) if bias else None
        self._dlr_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._latent_group: LatentGroup | None = None  # set by fuse_latents
        self._latent_slot = 0
        self._update_plain()

    def _update_plain(self) -> None:
        # The default layer (fixed s, no latent scale, no bias) keeps the three measured paths.
        # A plain Python bool, so torch.compile specialises on it instead of breaking the graph.
        self._plain = self.alpha_divisor is None and self.latent_scale is None and not self.has_trainable_latent_scale \
            and self.bias is None

    @property
    def has_trainable_latent_scale(self) -> bool:
        return "latent_scale_raw" in self._parameters

    @property
    def has_latent_scale(self) -> bool:
        return self.latent_scale is not None or self.has_trainable_latent_scale

    @property
    def has_residual(self) -> bool:
        return self.dlr_index is not None

    def effective_B(self) -> torch.Tensor:
        """The up weight the layer multiplies z by: B + s R (times c with a latent scale)."""
        if not self._plain:
            return self.up_weight()
        if self.dlr_index is None:
            return self.B
        # Out of place, so autograd sees B + s R and B's gradient is exactly dL/dB_eff;
        # each row o gets s added at column index[o]: one scatter kernel, no sort.
        return self.B.scatter_add(1, *self._scatter_operands())

    def _scatter_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index column, scale column) for B.scatter_add, cached for B's device and dtype.

        The scale column must live on B's device: a Python float turned into a tensor on the
        host would be a blocking host-to-device copy per call. Caching it saves a fill kernel
        and two ops of host overhead per projection. The cache follows the index object, so a
        load with assign=True or a device move (both replace the buffer) rebuilds it.
        """
        B, index, cache = self.B, self.dlr_index, self._dlr_cache
        if cache is None or cache[0] is not index or cache[2].dtype != B.dtype or cache[2].device != B.device:
            scale = torch.full((self.out_features, 1), self.dlr_scale, dtype=B.dtype, device=B.device)
            cache = self._dlr_cache = (index, index.unsqueeze(1), scale)
        return cache[1], cache[2]

    def residual_scale(self) -> torch.Tensor | float:
        """s: alpha / sqrt(K) or alpha, a tensor (with a gradient) when alpha is trainable."""
        return self.dlr_alpha / self.alpha_divisor if self.alpha_divisor is not None else self.dlr_scale

    def latent_multiplier(self) -> torch.Tensor | float | None:
        """c, or None: the reference's trainable form is tanh of a Parameter."""
        if self.has_trainable_latent_scale:
            return torch.tanh(self.latent_scale_raw)
        return self.latent_scale

    def up_weight(self) -> torch.Tensor:
        """c (B + s R) with pointwise ops only: any s and c, eager or compiled, one graph."""
        w = self.B
        if self.dlr_index is not None:
            cols = torch.arange(self.rank, device=w.device)
            w = torch.where(cols == self.dlr_index.unsqueeze(1), w + self.residual_scale(), w)
        c = self.latent_multiplier()
        return w if c is None else w * c

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """act(A x), the rank-r code that B (and the residual) map back up."""
        return activate(F.linear(x, self.A), self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._latent_group
        z = self.latent(x) if group is None else group.latent(self._latent_slot, x)
        if not self._plain:
            return F.linear(z, self.up_weight(), self.bias)
        if self.dlr_index is None:
            return F.linear(z, self.B)
        if torch.compiler.is_compiling():
            cols = torch.arange(self.rank, device=self.B.device)
            weight = torch.where(cols == self.dlr_index.unsqueeze(1), self.B + self.dlr_scale, self.B)
        elif torch.is_autocast_enabled(z.device.type):
            weight = self.effective_B()
        else:
            return _RebuiltResidualUp.apply(z, self.B, *self._scatter_operands())
        return F.linear(z, weight)

    @torch.no_grad()
    def fold_(self) -> bool:
        """B <- c (B + s R) with the current (learned) s and c; the layer is then a plain
        low-rank layer (bias kept) with no index, alpha or latent scale. False if nothing to fold.

        The folded weight is computed by the very ops the forward uses, so the folded layer
        gives bit-identical outputs.
        """
        if self.dlr_index is None and not self.has_latent_scale:
            return False
        self.B.copy_(self.effective_B())
        if self.dlr_index is not None:
            del self._buffers["dlr_index"]
        self.dlr_index = None
        self.dlr_scale = 0.0
        self._parameters.pop("dlr_alpha", None)
        self._parameters.pop("latent_scale_raw", None)
        self.alpha_divisor = self.latent_scale = None
        self._dlr_cache = None
        self._update_plain()
        return True

    def extra_repr(self) -> str:
        extra = ""
        if self.has_residual:
            extra += ", dlr_alpha=trainable" if self.alpha_divisor is not None else f", dlr_scale={self.dlr_scale:.4g}"
        if self.has_latent_scale:
            extra += ", latent_scale=" + ("tanh(trainable)" if self.has_trainable_latent_scale else f"{self.latent_scale:.4g}")
        if self.bias is not None:
            extra += ", bias=True"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, act={self.activation}{extra}"


# Projections of one parent that read the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_latents(model: nn.Module, enabled: bool = True) -> int:
    """Group q/k/v and gate/up of every decoder layer into LatentGroups (or ungroup them);
    returns the number of groups. In place; nothing in the parameters or the config changes."""
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for names in SIBLINGS:
                members = [getattr(parent, n, None) for n in names]
                for m in members:
                    if isinstance(m, LowRankLinear) and m._latent_group is not None:
                        m._latent_group.remove()
                if not enabled or not all(isinstance(m, LowRankLinear) for m in members):
                    continue
                first = members[0]
                if any((m.in_features, m.activation) != (first.in_features, first.activation) for m in members):
                    continue
                LatentGroup(members, parent)
                count += 1
    return count


def residual_projections(scope: str) -> tuple[str, ...]:
    return {"all": PROJECTIONS, "attn": ATTN_PROJECTIONS, "mlp": MLP_PROJECTIONS}[scope]


def factorize_projections(model: nn.Module, config) -> int:
    """Replace the seven dense projections of every decoder layer; returns how many.

    The dense nn.Linear modules are swapped before any weight initialisation runs, and a
    config with dlr_folded=True gets neither residual nor latent scale: its layout is that
    of a plain lowrank model.
    """
    if config.dlr_method == "full":
        return 0
    unfolded = not config.dlr_folded
    with_residual = config.dlr_method == "dlr" and unfolded
    residual_names = residual_projections(config.dlr_scope) if with_residual else ()
    rank = config.dlr_rank
    latent_alpha = config.dlr_latent_alpha if unfolded else None
    count = 0
    for layer_idx, layer in enumerate(model.model.layers):
        for part, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj in PROJECTIONS:
                dense = getattr(parent, proj, None)
                if dense is None:
                    continue
                d_in, d_out = dense.in_features, dense.out_features
                index, scale, divisor = None, 0.0, None
                if proj in residual_names:
                    # permuted keeps the name it was always seeded with, so its index is unchanged.
                    name = f"{layer_idx}.{proj}" if config.dlr_expand == "permuted" else f"model.layers.{layer_idx}.{part}.{proj}"
                    index = expand_index(d_out, rank, config.dlr_expand, config.dlr_seed, name)
                    k = expansion_factor(d_out, rank)
                    scale = config.dlr_alpha / math.sqrt(k) if config.dlr_variance_correction else config.dlr_alpha
                    if config.dlr_trainable_alpha:
                        divisor = math.sqrt(k) if config.dlr_variance_correction else 1.0
                setattr(parent, proj, LowRankLinear(
                    d_in, d_out, rank, config.dlr_activation, scale, index,
                    trainable_alpha_divisor=divisor,
                    latent_scale=None if latent_alpha is None else latent_alpha / rank,
                    trainable_latent_scale=unfolded and config.dlr_trainable_latent_scale,
                    bias=config.dlr_bias,
                ))
                count += 1
    return count
