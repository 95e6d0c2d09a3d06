"""The LLaMA Transformer in one file.

Pre-norm RMSNorm, rotary position embeddings (with LLaMA 3.1 frequency scaling), grouped-query attention with a
static per-row KV cache (each cache row one sequence, keys written at their positions: the gpt-fast / torchtune
contract), and a SwiGLU MLP. Parameter names follow Meta's reference checkpoints (`tok_embeddings`,
`layers.N.attention.wq`, `feed_forward.w1`, ...) and so does the rotary layout: each head's dimensions rotate in
adjacent pairs (0,1), (2,3), ... . The Hugging Face layout (first half against second half) is a permutation of the
q/k rows, applied in `checkpoints/hf.py`.
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


def lazily_committed(nbytes: int, device: torch.device) -> bool:
    """Whether `lazy_zeros` gives fresh anonymous pages for this size and device (the CPU, not Windows, 64 KiB+)."""
    import mmap

    return device.type == "cpu" and nbytes >= 1 << 16 and hasattr(mmap, "MAP_PRIVATE")


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """torch.zeros, except that on the CPU the memory is fresh anonymous pages: the OS supplies them zeroed on
    first write, so a cache costs resident memory only for the positions actually used (torch.zeros writes,
    and so commits, every byte up front)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not lazily_committed(nbytes, device):
        return torch.zeros(shape, dtype=dtype, device=device)

    from .quant.memory import lazy_zeros_buffer

    try:
        buffer = lazy_zeros_buffer(nbytes)
    except (OSError, ValueError, MemoryError):
        raise ConfigError(f"cannot reserve {nbytes:,} bytes for a KV cache of shape {list(shape)}; "
                          f"pass a smaller --max-context") from None
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class KVCache(nn.Module):
    """Keys and values of `max_rows` independent sequences, `max_seq_len` positions each (resident as they fill).

    Static: a key is written at its row and position and never moved; each row has its own timeline."""

    def __init__(self, max_rows: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_rows, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", lazy_zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", lazy_zeros(shape, dtype, device), persistent=False)

    def update(self, rows: Tensor, positions: Tensor, span: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hk, T, D) at cache row rows[b], positions[b, t]; return each row's keys and values at
        positions [0, span) as (B, Hk, span, D)."""
        index = (rows[:, None], slice(None), positions)  # advanced indices around a slice: (B, T, Hk, D)
        self.k[index] = k.transpose(1, 2).to(self.k.dtype)
        self.v[index] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :span], self.v[rows, :, :span]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_size
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache_at: tuple[Tensor, Tensor, int] | None) -> Tensor:
        """cache_at: (rows, positions, span) to write this call's keys/values into the cache and attend to
        positions [0, span) of those rows (the mask says which); None attends to this call's tokens only."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_at is not None:
            k, v = self.cache.update(*cache_at, k, v)
            if k.dtype != q.dtype:  # a float16 cache under float32 activations: the attention math stays float32
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache_at: tuple[Tensor, Tensor, int] | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_at)
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

    def setup_cache(self, max_rows: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """Preallocate a static KV cache of `max_rows` rows of `max_seq_len` positions; forward() with
        `cache_rows` then reads and writes it."""
        device = self.inv_freq.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_rows, max_seq_len, self.config.kv_heads, self.config.head_size,
                                            dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def caches(self) -> list[KVCache]:
        """Each layer's KV cache (empty without setup_cache)."""
        caches = [layer.attention.cache for layer in self.layers]
        return [] if caches[0] is None else caches

    # -- forward ------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, cache_rows: Tensor | None = None,
                key_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) for `tokens` (B, T).

        positions:   (B, T) rotary positions; default arange(T).
        cache_rows:  (B,) cache row of each batch row (needs setup_cache): token t of row b writes its key and
                     value at cache row cache_rows[b], position positions[b, t], and attends to that row's
                     positions <= its own (within the sliding window). Each row's earlier positions must hold
                     what its caller put there. Without cache_rows the cache is not touched (training).
        key_mask:    (B, T) bool, False for padding no query may attend to (without a cache).
        segment_ids: (B, T) for packed training sequences: attention stays inside a segment (without a cache).
        last_only:   compute logits for the last position only (prefill needs nothing else).
        return_hidden: the final-norm hidden states (B, T, dim) instead of logits (see lm_head).
        """
        T = tokens.shape[1]
        device = tokens.device
        if positions is None:
            if cache_rows is not None:
                raise ValueError("cache_rows needs positions: each row has its own")
            positions = torch.arange(T, device=device).unsqueeze(0)
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B|1, T, D/2)
        cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
        if cache_rows is None:
            cache_at = None
            mask = self._attention_mask(T, key_mask, segment_ids, device)
        else:
            cache_at, mask = self._cache_mask(cache_rows, positions, key_mask, segment_ids)

        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache_at, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_at)
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

    def _cache_mask(self, rows: Tensor, positions: Tensor, key_mask: Tensor | None,
                    segment_ids: Tensor | None) -> tuple[tuple[Tensor, Tensor, int], Tensor]:
        """((rows, positions, span), boolean (B, 1, T, span) mask) for a forward through the cache."""
        if not self.caches:
            raise ValueError("cache_rows needs a KV cache: call setup_cache() first")
        if key_mask is not None or segment_ids is not None:
            raise ValueError("key_mask and segment_ids are for forward without a cache: rows have their own positions")
        max_rows, _, max_len, _ = self.caches[0].k.shape
        if rows.ndim != 1 or rows.shape[0] != positions.shape[0]:
            raise ValueError(f"cache_rows {tuple(rows.shape)}: expected one row per batch row ({positions.shape[0]})")
        lo, hi = int(positions.min()), int(positions.max())  # one host sync: the span of keys to read
        if lo < 0 or hi >= max_len:
            raise ValueError(f"positions {lo}..{hi} are outside the KV cache's 0..{max_len - 1}")
        if int(rows.min()) < 0 or int(rows.max()) >= max_rows:
            raise ValueError(f"cache rows {rows.tolist()} are outside the KV cache's 0..{max_rows - 1}")
        span = hi + 1
        k_pos = torch.arange(span, device=positions.device).view(1, 1, span)
        q_pos = positions.unsqueeze(-1)  # (B, T, 1)
        allowed = k_pos <= q_pos  # keys past a row's own position are another sequence's or not written yet
        if self.config.sliding_window is not None:
            allowed = allowed & (q_pos - k_pos < self.config.sliding_window)
        return (rows, positions, span), allowed.unsqueeze(1)

    def _attention_mask(self, T: int, key_mask: Tensor | None, segment_ids: Tensor | None,
                        device: torch.device) -> Tensor | None:
        """Boolean (B|1, 1, T, T) mask over this call's tokens, or None when plain causal attention is exact."""
        window = self.config.sliding_window
        if key_mask is None and segment_ids is None and (window is None or window >= T):
            return None
        q_pos = torch.arange(T, device=device).view(T, 1)
        k_pos = torch.arange(T, device=device).view(1, T)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        allowed = allowed.view(1, 1, T, T)
        if key_mask is not None:
            allowed = allowed & key_mask.view(key_mask.shape[0], 1, 1, T).bool()
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # A query may always see itself: a padding row with no visible key would give NaN.
        return allowed | (q_pos == k_pos).view(1, 1, T, T)
