"""Reference Llama-style models used by the tests, the README demo and the benchmarks.

`DecoderBlock` is one pre-norm transformer layer as in Llama 2/3: RMSNorm, rotary
position embeddings (computed in the graph with sin/cos from the token positions),
grouped-query attention through `scaled_dot_product_attention`, and a SwiGLU MLP. Keys
and values go into a static KV cache (registered buffers of shape
`[batch, n_kv_heads, max_seq_len, head_dim]`) updated in place, so one compiled graph
serves prefill (`T` tokens) and another serves decode (1 token) without reallocations.
`TinyLlama` stacks blocks between a token embedding and an output projection.
A `DecoderBlock` is a `torch.compiler.nested_compile_region`: `torch.compile` traces one
layer and reuses the trace for the others (the KV-cache mutation does not prevent it).

`fused=True` (or `fuse_projections_` on a built model) keeps q/k/v in one `wqkv` linear and
the SwiGLU gate/up in one `w13`, split after the matmul: the same outputs from 14 tensors per
layer instead of 20, which dynamo wraps, lifts and guards once per layer and graph (a
third of a warm-cache compile's time goes to that). Weights keep their unfused names where
they are made (`init_weights_`, `logical_weights`): the same seed gives the same values in
either layout.

Weights are initialised deterministically from `seed`; nothing is downloaded.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

CACHE_UPDATES = ("index_copy", "index_put", "slice")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Dimensions of a Llama-style decoder. `hidden_dim` is the SwiGLU inner width."""

    dim: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    hidden_dim: int = 688
    max_seq_len: int = 256
    max_batch: int = 1
    vocab_size: int = 512
    n_layers: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # How new keys/values enter the cache: `index_copy_` along the sequence dim,
    # `cache[:, :, pos] = kv` (index_put_), or `cache[:, :, start:start + T] = kv`.
    cache_update: str = "index_copy"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.cache_update not in CACHE_UPDATES:
            raise ValueError(f"cache_update must be one of {CACHE_UPDATES}, got {self.cache_update!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` `[B, H, T, D]` with `cos`/`sin` `[T, D]` (half-split layout)."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


class KVCache(nn.Module):
    """Static per-layer key/value cache written in place at the given positions."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype):
        super().__init__()
        shape = (cfg.max_batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.mode = cfg.cache_update
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        b = k.shape[0]
        if self.mode == "index_copy":
            self.k[:b].index_copy_(2, input_pos, k)
            self.v[:b].index_copy_(2, input_pos, v)
        elif self.mode == "index_put":
            self.k[:b, :, input_pos] = k
            self.v[:b, :, input_pos] = v
        else:
            # Slice assignment needs a Python start; dynamo specialises the graph on it.
            start = int(input_pos[0])
            self.k[:b, :, start:start + k.shape[2]] = k
            self.v[:b, :, start:start + k.shape[2]] = v
        return self.k[:b], self.v[:b]

    def reset(self) -> None:
        _zero(self.k)
        _zero(self.v)


def _zero(t: torch.Tensor) -> None:
    """t.zero_(), without torch's thread pool for a contiguous CPU tensor: a parallel fill
    leaves torch's OpenMP workers spinning into the compiled prefill that follows a reset,
    where they compete with lowbit's own threads (the 1b prefill after a reset: 1.061x per
    round with memset, 15 rounds in one process)."""
    if t.device.type == "cpu" and t.is_contiguous():
        ctypes.memset(t.data_ptr(), 0, t.numel() * t.element_size())
    else:
        t.zero_()


class Attention(nn.Module):
    """Grouped-query attention; q/k/v as three linears, or one `wqkv` (`fused`)."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, fused: bool = False):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.fused = fused
        if fused:
            self.wqkv = nn.Linear(cfg.dim, sum(self.qkv_sizes()), bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.cache = KVCache(cfg, dtype)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        causal = torch.tril(torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)

    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of q, k and v (the row blocks of `wqkv`)."""
        cfg = self.cfg
        return cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        if self.fused:
            q, k, v = self.wqkv(x).split(self.qkv_sizes(), dim=-1)
            q = q.view(b, t, cfg.n_heads, hd).transpose(1, 2)
            k = k.view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
            v = v.view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        else:  # (the graph as before fused layers existed, op for op)
            q = self.wq(x).view(b, t, cfg.n_heads, hd).transpose(1, 2)
            k = self.wk(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
            v = self.wv(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)

        angles = input_pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        keys, values = self.cache.update(input_pos, k, v)
        rep = cfg.n_heads // cfg.n_kv_heads
        s = keys.shape[2]
        keys = keys[:, :, None].expand(b, cfg.n_kv_heads, rep, s, hd).reshape(b, cfg.n_heads, s, hd)
        values = values[:, :, None].expand(b, cfg.n_kv_heads, rep, s, hd).reshape(b, cfg.n_heads, s, hd)
        mask = self.causal[input_pos]                                  # [T, max_seq_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, cfg.dim))


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) * w3 x)`; w1 and w3 as one `w13` (`fused`: rows of w1, then w3)."""

    def __init__(self, cfg: LlamaConfig, fused: bool = False):
        super().__init__()
        self.fused = fused
        if fused:
            self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        else:
            self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
            self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    """One Llama layer: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.

    `forward(x [B, T, dim], input_pos int64 [T])` writes the new keys/values at
    `input_pos` into the cache; prefill passes `arange(T)`, decode one position.
    """

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, dtype, fused)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg, fused)

    # `torch.compile` traces one layer and stamps it out for the others (`invoke_subgraph`),
    # which cuts dynamo's tracing of a 16-layer model ~3x; a no-op in eager. The lowbit backend
    # inlines the calls again (`frontend.inline_nested_regions`) and compiles the repeated
    # layers once itself. Set `DecoderBlock.trace_once = False` to trace every layer.
    trace_once = True

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # The "slice" cache update reads `int(input_pos[0])`: a graph break, which a nested
        # region does not allow (dynamo raises UncapturedHigherOrderOpError).
        if self.trace_once and self.attention.cache.mode != "slice":
            return self._region(x, input_pos)
        return self._layer(x, input_pos)

    # Layers that differ (another weight format, width) are traced apart, one reuse entry per
    # structure; dynamo raises past `max_reuse_entries` (default 8): allow layers that all differ.
    @torch.compiler.nested_compile_region(max_reuse_entries=64)
    def _region(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self._layer(x, input_pos)

    def _layer(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class TinyLlama(nn.Module):
    """Token embedding, `n_layers` decoder blocks, final RMSNorm and output projection."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg, dtype, fused) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits `[B, T, vocab]`; with `logits_to_keep` = n > 0 only those of the last n positions
        (as transformers' argument: a prefill that samples one token needs one row of the head,
        not T)."""
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, input_pos)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.output(self.norm(h))


# fused linear -> its parts, in row order
_FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def _part_sizes(owner: nn.Module, fused_name: str) -> tuple[int, ...]:
    if fused_name == "wqkv":
        return owner.qkv_sizes()
    half = owner.w13.out_features // 2
    return half, half


def logical_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """`named_parameters()` under the unfused names: a fused `wqkv.weight` / `w13.weight`
    appears as its row blocks (views) named `wq.weight`, `wk.weight`, ... (fp linears only)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        path, _, leaf = name.rpartition(".")
        owner_path, _, lin = path.rpartition(".")
        if leaf == "weight" and lin in _FUSED:
            owner = module.get_submodule(owner_path)
            if isinstance(owner, (Attention, FeedForward)) and owner.fused:
                prefix = owner_path + "." if owner_path else ""
                for part, rows in zip(_FUSED[lin], p.split(_part_sizes(owner, lin), dim=0)):
                    out[f"{prefix}{part}.weight"] = rows
                continue
        out[name] = p
    return out


def init_weights_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic init: N(0, 1/fan_in) for matrices, N(0, 1) embeddings, 1 +- 0.1 norms.

    Drawn per unfused weight name (`logical_weights`), so fused and unfused layers get the same values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(logical_weights(module).items()):
            if p.ndim == 2 and "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return module


def make_decoder_block(cfg: LlamaConfig | None = None, dtype: torch.dtype = torch.float32,
                       seed: int = 0, fused: bool = False) -> DecoderBlock:
    """A `DecoderBlock` in eval mode with seeded weights, cast to `dtype`."""
    cfg = cfg or LlamaConfig()
    block = init_weights_(DecoderBlock(cfg, dtype, fused), seed)
    return _finish(block, dtype)


def make_tiny_llama(cfg: LlamaConfig | None = None, dtype: torch.dtype = torch.float32,
                    seed: int = 0, fused: bool = False) -> TinyLlama:
    """A `TinyLlama` in eval mode with seeded weights, cast to `dtype`."""
    cfg = cfg or LlamaConfig()
    model = init_weights_(TinyLlama(cfg, dtype, fused), seed)
    return _finish(model, dtype)


def fuse_projections_(module: nn.Module) -> int:
    """Fuse q/k/v into `wqkv` and w1/w3 into `w13` in every `Attention` / `FeedForward` of
    `module`, in place (weights, quantized or not, are concatenated by rows: the outputs stay
    the same). Returns how many groups were fused.

    Parts must be all `nn.Linear` (same dtype, device, no bias) or all `lowbit.LowBitLinear`
    of one format (same spec but the output width). Per-tensor scales (ternary) that differ
    between the parts become per-row scales (granularity "channel"), each row keeping its
    part's scale; equal ones stay one scale. Anything else raises ValueError naming it.
    """
    fused = 0
    for owner_name, owner in list(module.named_modules()):
        if not isinstance(owner, (Attention, FeedForward)) or owner.fused:
            continue
        target = "wqkv" if isinstance(owner, Attention) else "w13"
        parts = _FUSED[target]
        where = f"{owner_name + '.' if owner_name else ''}{target}"
        linear = _concat_linears([getattr(owner, p) for p in parts], where)
        for p in parts:
            delattr(owner, p)
        setattr(owner, target, linear)
        owner.fused = True
        fused += 1
    return fused


def _concat_linears(parts: list[nn.Module], where: str) -> nn.Module:
    from lowbit.quant.module import LowBitLinear

    kinds = {type(p) for p in parts}
    if kinds == {nn.Linear}:
        w = [p.weight for p in parts]
        if any(p.bias is not None for p in parts) or len({(t.dtype, t.device) for t in w}) != 1:
            raise ValueError(f"cannot fuse {where}: its parts have a bias or differ in dtype/device")
        out = nn.Linear(w[0].shape[1], sum(t.shape[0] for t in w), bias=False, device=w[0].device, dtype=w[0].dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat(w, dim=0))
        out.weight.requires_grad_(w[0].requires_grad)
        return out
    if kinds == {LowBitLinear}:
        specs = [p.spec for p in parts]
        n = sum(s.out_features for s in specs)
        same = {dataclasses.replace(s, out_features=n) for s in specs}
        if len(same) != 1 or any(p.bias is not None for p in parts):
            raise ValueError(f"cannot fuse {where}: its parts differ in format ({', '.join(s.describe() for s in specs)}) "
                             "or have a bias")
        spec = same.pop()
        scales = [p.scales for p in parts]
        if spec.granularity == "tensor" and any(not torch.equal(s, scales[0]) for s in scales):
            # one scale per part -> one per row (exactly the same products per output element)
            spec = dataclasses.replace(spec, granularity="channel")
            scales = [s.expand(p.out_features, 1) for s, p in zip(scales, specs)]
        elif spec.granularity == "tensor":
            scales = scales[:1]
        from lowbit.quant.config import QuantConfig

        out = LowBitLinear(spec.in_features, n, bias=False, config=QuantConfig.from_spec(spec))
        with torch.no_grad():
            out.packed.copy_(torch.cat([p.packed for p in parts], dim=0))
            out.scales.copy_(torch.cat(scales, dim=0))
            if out.zero_points is not None:
                out.zero_points.copy_(torch.cat([p.zero_points for p in parts], dim=0))
        return out
    raise ValueError(f"cannot fuse {where}: its parts are {sorted(k.__name__ for k in kinds)} "
                     "(all nn.Linear or all lowbit.LowBitLinear are supported)")


def _finish(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Cast parameters only: the rotary inverse frequencies stay fp32 and the mask bool.
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module.eval().requires_grad_(False)


def reset_caches(module: nn.Module) -> None:
    """Zero every KV cache in `module` (start a new sequence)."""
    for m in module.modules():
        if isinstance(m, KVCache):
            m.reset()
