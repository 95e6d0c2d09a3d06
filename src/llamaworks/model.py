"""The LLaMA Transformer in one file.

Pre-norm RMSNorm, rotary position embeddings (with LLaMA 3.1 frequency scaling), grouped-query
attention with a preallocated KV cache, and a SwiGLU MLP. Parameter names follow Meta's reference
checkpoints (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...) and so does the rotary
layout: each head's dimensions rotate in adjacent pairs (0,1), (2,3), ... . The Hugging Face layout
(first half against second half) is a permutation of the q/k rows, applied in `checkpoints/hf.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, rope_inverse_frequencies
from .errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as the reference does: bf16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies theta^(-2i/d) (float64), with LLaMA 3.1 ("llama3") or linear scaling applied."""
    return torch.from_numpy(rope_inverse_frequencies(config))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (B, H, T, D) by the angles whose cos/sin are (B or 1, 1, T, D/2)."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """torch.zeros, except that on the CPU the memory is fresh anonymous pages: the OS supplies them zeroed on
    first write, so a cache costs resident memory only for the positions actually used (torch.zeros writes,
    and so commits, every byte up front)."""
    import mmap

    device = torch.device(device) if device is not None else torch.get_default_device()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < 1 << 16 or not hasattr(mmap, "MAP_PRIVATE"):  # (not on Windows)
        return torch.zeros(shape, dtype=dtype, device=device)

    from .quant.memory import lazy_zeros_buffer

    try:
        buffer = lazy_zeros_buffer(nbytes)
    except (OSError, ValueError, MemoryError):
        raise ConfigError(f"cannot reserve {nbytes:,} bytes for a KV cache of shape {list(shape)}; "
                          f"pass a smaller --max-context") from None
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class KVCache(nn.Module):
    """Keys and values of every past position, preallocated for `max_seq_len` slots (resident as they fill)."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", lazy_zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", lazy_zeros(shape, dtype, device), persistent=False)

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, {end} requested")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_size
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
            if k.dtype != q.dtype:  # a float16 cache under float32 activations (the fast CPU path)
                k, v = k.to(q.dtype), v.to(q.dtype)
        # enable_gqa lets each group of query heads read its shared key/value head without copies.
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models (SmolLM2, LLaMA 3.2) read logits off the embedding matrix: no `output` weight.
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        if torch.empty(0).is_meta:
            # A skeleton whose tensors are adopted later (load_model, runtime): no values to compute, and
            # arange on the meta device would import torch's reference decompositions (+60 MiB resident).
            inv_freq = torch.empty(config.head_size // 2)
        else:
            inv_freq = rope_frequencies(config).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.activation_checkpointing = False

    # -- set-up -------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init as in the LLaMA papers: N(0, 0.02), residual outputs scaled by depth."""
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache; forward() then appends to it at `start_pos`.

        dtype: default `kv_cache_dtype()` (the activation dtype, or float16 where the fast path set it).
        """
        length = max_seq_len or self.config.max_seq_len
        dtype = dtype or self.kv_cache_dtype()
        device = self.inv_freq.device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, length, self.config.kv_heads, self.config.head_size,
                                            dtype, device)

    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type: `self.kv_dtype` when set (runtime.py sets float16 for the native CPU
        decode, as llama.cpp does), else the activation dtype (the final norm's; the embedding may be a
        quantized uint8 table)."""
        explicit = getattr(self, "kv_dtype", None)
        if explicit is not None:
            return explicit
        dtype = self.norm.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.cache is not None

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, start_pos: int = 0, *, key_mask: Tensor | None = None,
                positions: Tensor | None = None, segment_ids: Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) for `tokens` (B, T).

        start_pos:   cache slot of tokens[:, 0] (with a KV cache set up); keys are slots [0, start_pos+T).
        key_mask:    (B, start_pos+T) bool, False for padding slots that no query may attend to.
        positions:   (B, T) rotary positions; default start_pos + arange(T). Left-padded rows pass their own.
        segment_ids: (B, T) for packed training sequences: attention stays inside a segment.
        last_only:   compute logits for the last position only (prefill needs nothing else).
        """
        T = tokens.shape[1]
        if not self.has_cache and start_pos:
            raise ValueError("start_pos needs a KV cache: call setup_cache() first")
        device = tokens.device
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=device).unsqueeze(0)
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B|1, T, D/2)
        cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
        mask = self._attention_mask(T, start_pos, key_mask, segment_ids, device)

        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, start_pos)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)

    def lm_head(self, hidden: Tensor) -> Tensor:
        if self.output is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)

    def _attention_mask(self, T: int, start_pos: int, key_mask: Tensor | None, segment_ids: Tensor | None,
                        device: torch.device) -> Tensor | None:
        """Boolean (B|1, 1, T, S) mask, or None when plain causal attention (or none) is exact."""
        window = self.config.sliding_window
        S = start_pos + T
        # SDPA's is_causal aligns the mask to the top-left corner, which is right only when queries and keys
        # start together (start_pos == 0); one query (T == 1) may see every cached key.
        plain = start_pos == 0 or T == 1
        if plain and key_mask is None and segment_ids is None and (window is None or window >= S):
            return None
        q_pos = torch.arange(start_pos, S, device=device).view(T, 1)
        k_pos = torch.arange(S, device=device).view(1, S)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        allowed = allowed.view(1, 1, T, S)
        if key_mask is not None:
            allowed = allowed & key_mask.view(key_mask.shape[0], 1, 1, S).bool()
        if segment_ids is not None:
            if start_pos:
                raise ValueError("segment_ids are for training without a cache")
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # A query may always see itself: a padding row with no visible key would give NaN, and NaN
        # values in the cache poison every later query even when masked.
        return allowed | (q_pos == k_pos).view(1, 1, T, S)
