"""A small causal transformer over VQ-VAE code grids, so a VQ-VAE can generate, not only reconstruct.

Codes are read in raster order; position t predicts code t from codes < t (a learned start token feeds
position 0). Training: `loss(indices)`; generation: `sample(n, h, w)` with a key/value cache (one token per step).
A conditional prior (`conditions`) adds the embedding of the slice's attributes to every position's input, so
the code grid it draws fits the requested slice position, site, age or sex.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrigen.models.condition import ConditionEmbedding, hide_for_guidance

__all__ = ["CodePrior", "gumbel_noise"]

HEAD_DIM = 16  # channels per attention head: heads = channels / 16

_Cache = list[tuple[torch.Tensor, torch.Tensor]]


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention + 4x MLP."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = channels // HEAD_DIM
        self.ln1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ln2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, T, C), causal over T. With `cache` (keys, values of the T0 earlier positions, each
        (B, heads, T0, C/heads)), x must be the single next position (T = 1).
        Returns (y (B, T, C), (keys, values) including x's positions)."""
        b, t, c = x.shape
        if cache is not None and t != 1:
            raise ValueError(f"a cached step takes one position, got {t}")
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # (B, heads, T0, d) ++ (B, heads, T, d)
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        # a single cached query may see every earlier key; a full sequence needs the causal mask
        att = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and t > 1)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))  # (B, heads, T, d) -> (B, T, C)
        return x + self.mlp(self.ln2(x)), (k, v)


class CodePrior(nn.Module):
    """Autoregressive prior p(indices) over an h x w grid of codes from a `num_codes` codebook.

    Args:
        num_codes: codebook size K.
        max_positions: h * w of the grids it models (positions are learned embeddings).
        channels: transformer width (a multiple of 16).
        layers: transformer blocks.
        conditions: attribute names it is conditioned on (empty: unconditional).
    """

    def __init__(self, num_codes: int, max_positions: int, channels: int, layers: int,
                 conditions: tuple[str, ...] = ()) -> None:
        super().__init__()
        if channels % HEAD_DIM:
            raise ValueError(f"channels={channels} must be a multiple of {HEAD_DIM}")
        self.num_codes = num_codes
        self.max_positions = max_positions
        self.tok = nn.Embedding(num_codes + 1, channels)  # index num_codes = start token
        self.pos = nn.Parameter(torch.zeros(max_positions, channels))
        self.blocks = nn.ModuleList(_Block(channels) for _ in range(layers))
        self.ln = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, num_codes)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.condition = ConditionEmbedding(conditions, channels) if conditions else None

    def _embed(self, attrs: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, C) condition term for encoded attributes (B, A) (None: unknown); None if unconditional."""
        if self.condition is None:
            return None
        if attrs is None:
            attrs = torch.full((b, len(self.condition.names)), float("nan"), device=device)
        return self.condition(attrs.to(device)).unsqueeze(1)

    def _check_grid(self, h: int, w: int) -> None:
        if h * w > self.max_positions:
            raise ValueError(f"a {h}x{w} code grid has {h * w} positions; this prior models at most "
                             f"{self.max_positions}")

    def logits(self, indices: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """indices: (B, h, w) int64 (and attrs (B, A) for a conditional prior) -> logits (B, h*w, K);
        logits[:, t] predicts code t in raster order."""
        if indices.dim() != 3 or indices.dtype != torch.long:
            raise ValueError(f"expected indices (B, h, w) int64, got shape {tuple(indices.shape)} {indices.dtype}")
        b, h, w = indices.shape
        self._check_grid(h, w)
        flat = indices.reshape(b, h * w)  # (B, h, w) -> (B, L)
        start = torch.full((b, 1), self.num_codes, dtype=torch.long, device=indices.device)
        x = self.tok(torch.cat([start, flat[:, :-1]], dim=1)) + self.pos[: h * w]  # shifted right: (B, L, C)
        c = self._embed(attrs, b, indices.device)
        if c is not None:
            x = x + c
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.ln(x))

    def loss(self, indices: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats per code) of `indices` (B, h, w) int64 under the prior: a scalar tensor."""
        logits = self.logits(indices, attrs)
        return F.cross_entropy(logits.float().flatten(0, 1), indices.reshape(-1))

    def step(self, token: torch.Tensor, t: int, cache: _Cache, c: torch.Tensor | None = None) -> torch.Tensor:
        """One cached decoding step: token (n, 1) int64 = code t-1 (or the start token for t = 0) -> logits (n, K)
        for code t. `cache` holds one (keys, values) entry per block (None before t = 0) and is updated in place;
        `c` is the (n, 1, C) condition term of a conditional prior."""
        x = self.tok(token) + self.pos[t]  # (n, 1, C)
        if c is not None:
            x = x + c
        for i, block in enumerate(self.blocks):
            x, cache[i] = block(x, cache[i])
        return self.head(self.ln(x))[:, 0]

    def empty_cache(self) -> _Cache:
        """A fresh key/value cache for `step` (one empty slot per block)."""
        return [None] * len(self.blocks)  # type: ignore[list-item]

    @torch.no_grad()
    def sample(self, n: int, h: int, w: int, generator: torch.Generator | None = None, *,
               temperature: float = 1.0, top_k: int = 0, attrs: torch.Tensor | None = None,
               guidance: float = 1.0, guidance_on: tuple[str, ...] = ()) -> torch.Tensor:
        """Draw n code grids, one position at a time (Gumbel-max sampling, key/value cache).

        Args:
            n: number of grids (>= 1).
            h, w: grid size (h * w <= max_positions; the VQ-VAE passes its own grid).
            generator: optional RNG on any device (noise is drawn on its device, then moved to the model's).
            temperature: logits are divided by it (> 0; 1 = the model's distribution).
            top_k: keep only the k most likely codes at each position (0 = all).
            attrs: (n, A) encoded attributes for a conditional prior (None: unknown).
            guidance: classifier-free guidance weight w of a conditional prior given `attrs`: the logits are
                hidden + w * (conditioned - hidden), where "hidden" is `attrs` with the `guidance_on` attributes
                set to unknown (the learned unknown vectors that condition dropout trains). 1 = the conditioned
                logits alone (one pass); w > 1 follows those attributes more closely, at twice the cost per step.
            guidance_on: the attributes guidance strengthens (names from the prior's conditions); () = all.
                Condition dropout hides each attribute on its own, so guiding one attribute is what training
                prepared for; hiding all at once is rarely seen unless `TrainConfig.condition_dropout_all` > 0.

        Returns:
            (n, h, w) int64 indices in [0, K) on the prior's device.
        """
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if top_k < 0:
            raise ValueError(f"top_k={top_k!r} must be >= 0 (0 = all codes)")
        if not guidance >= 1.0:
            raise ValueError(f"guidance={guidance!r} must be >= 1 (1 = no guidance)")
        self._check_grid(h, w)
        device = self.pos.device
        noise_device = generator.device if generator is not None else device
        c = self._embed(attrs, n, device)
        guided = c is not None and attrs is not None and guidance != 1.0
        if guided:                                   # rows n.. of the batch see the guided attributes as unknown
            hidden = hide_for_guidance(self.condition.names, attrs.to(device), guidance_on)
            c = torch.cat([c, self._embed(hidden, n, device)])
        token = torch.full((2 * n if guided else n, 1), self.num_codes, dtype=torch.long, device=device)
        cache = self.empty_cache()
        out = torch.empty(n, h * w, dtype=torch.long, device=device)
        for t in range(h * w):
            logits = self.step(token, t, cache, c).float()  # (n, K), or (2n, K) when guided
            if guided:
                cond, unknown = logits.chunk(2)
                logits = unknown + guidance * (cond - unknown)
            logits = logits / temperature
            if 0 < top_k < self.num_codes:
                kth = logits.topk(top_k, dim=1).values[:, -1:]  # (n, 1): the k-th largest logit
                logits = logits.masked_fill(logits < kth, float("-inf"))
            u = torch.rand(logits.shape, generator=generator, device=noise_device).to(device)
            out[:, t] = (logits + gumbel_noise(u)).argmax(dim=1)
            token = out[:, t : t + 1].repeat(2, 1) if guided else out[:, t : t + 1]
        return out.view(n, h, w)


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) from uniforms u in [0, 1), finite everywhere (u is clamped away from 0
    and 1 so neither logarithm sees 0)."""
    u = u.clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))
