"""A learned spatial prior for a VAE's latent grid: flow matching with a small convolutional U-Net.

What `VAE.sample` draws z from when `ModelConfig.latent_prior == "flow"`.

Why: a VAE with a fine latent grid (16 x 16 x 8 at 64 px) reconstructs held-out slices at 32-33 dB with nearly the
real amount of fine detail, but a Gaussian mixture fitted to its posterior means cannot hold 16 x 16 positions
together (doubled, frayed rims; fd_ratio 5-7, bench/RESULTS.md session 11). A convolutional network that learns how
neighbouring latent positions go together can; latent diffusion models (Rombach et al., CVPR 2022; Pinaya et al.,
"Brain imaging generation with latent diffusion models", 2022) are the same idea at scale.

The model: rectified flow / flow matching (Lipman et al., ICLR 2023; Liu et al., ICLR 2023). With z1 a training
latent (standardised per channel) and z0 ~ N(0, I), x_t = (1 - t) z0 + t z1 and the network v(x_t, t) regresses
z1 - z0; sampling integrates dx/dt = v(x, t) from t = 0 to 1 (Heun's method, `ode_steps` steps, two network
calls each). The training latents are draws z = mu + sigma * eps from each slice's posterior, the aggregate
posterior the decoder was trained on, not only its means: the posterior noise keeps a prior trained on a few
thousand slices from fitting those points alone.

Measured on the 120-subject demo cohort at 64 px (one 8-epoch recommended VAE, 16 x 16 x 8 latent, 500 samples
against the held-out slices; bench/RESULTS.md, session 12): fd_ratio 4.8 from the fitted mixture; from a 32-wide
flow after 4,000 steps of 64 latents 5.9 at learning rate 2e-4, 1.7 at 1e-3, 1.2-1.3 at 2e-3, with no sample
flagged as a copy; trained on the posterior means alone instead of draws, 2.0. A 64-wide flow at 2e-4 learned
slower still (11.5 after 2,000 steps).

Conditioning (`conditions`): a conditional flow learns p(z | attributes). The attributes' embedding
(mrigen.models.condition, its learned "unknown" vectors included) is added to the time embedding, as class labels
enter diffusion U-Nets (Dhariwal & Nichol, 2021); the autoencoder stays unconditional, as a VQ-VAE's does. With
condition dropout in training, sampling can apply classifier-free guidance (Ho & Salimans, 2021) to the velocity:
v_hidden + w * (v_conditioned - v_hidden). Measured on the demo cohort (bench/RESULTS.md, session 13): conditioned on
slice position and site, generated slices read back closer to the request than real ones do (0.84-0.96x the
probe's position error) with no copies; conditioned also on age and sex, which with site name one training
subject, 42-44% of samples were copies of training slices.

Autoguidance (`guide=True`, `draw(..., autoguidance=w)`; Karras et al., "Guiding a diffusion model with a bad
version of itself", NeurIPS 2024): training keeps a copy of the flow's own EMA weights from early in its training
(`train.flow_guide_at`, 20% of the steps) as a guide, and sampling integrates v_guide + w * (v - v_guide). The
early flow makes the trained one's errors, only larger (soft, blotchy latents); stepping away from it removes part
of them without narrowing the samples the way classifier-free guidance does. It costs no training, one more
network pass per evaluation and a second copy of the (small) network. Measured on the same 2,500-step flow
(bench/RESULTS.md, session 15), guide at 20%: fd_ratio 1.47 -> 0.98 / 1.00 (w 1.8 / 2.0), fine detail 0.71 ->
0.93 / 1.01 of real, diversity 0.687 -> 0.663 / 0.656 (real 0.630), no copies (a second flow: 1.51-1.57 -> 1.15-1.24
at w 2.0, 2 of 500 samples flagged as copies); too strong (w 2.5) oversharpens (fine detail 1.26, fd_ratio 1.49).
On top of classifier-free guidance the two stack: over guidance 1.5, w 1.5 sharpened without lowering fd_ratio and
w 2 overshot.

Training (the budget, EMA of the weights, the guide's snapshot, condition dropout) lives in mrigen.train.prior;
this module holds the network, the per-channel standardisation and the sampler. Whether a trained flow copies
training slices is what the copy detector (`memorised` in evaluate) is for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrigen.models.blocks import make_norm
from mrigen.models.condition import ConditionEmbedding, hide_for_guidance

__all__ = ["FlowLatentPrior", "VelocityNet"]

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * TIME_SCALE (the usual range of diffusion timestep embeddings)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times t `(B,)` in [0, 1] -> `(B, dim)` (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * TIME_SCALE * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, plus the time embedding per channel, then GroupNorm-SiLU-conv3x3, plus a skip."""

    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = make_norm("group", c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = make_norm("group", c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class VelocityNet(nn.Module):
    """v(x_t, t[, attributes]): a two-level U-Net over a latent grid (two residual blocks at the grid's resolution,
    two at half of it with twice the width, one skip connection).

    Args:
        channels: latent channels D.
        width: feature maps at the full resolution (a multiple of 8).
        conditions: attribute names of a conditional flow (their embedding is added to the time embedding);
            empty: unconditional.

    Shapes: x `(B, D, h, w)` with h, w even, t `(B,)` in [0, 1], attrs `(B, A)` encoded (NaN = unknown; None: all
    unknown; unconditional nets take none) -> `(B, D, h, w)`.
    """

    def __init__(self, channels: int, width: int = 64, conditions: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.width = width
        tdim = 4 * width
        self.time = nn.Sequential(nn.Linear(width, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.condition = ConditionEmbedding(conditions, tdim) if conditions else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.high = nn.ModuleList([_TimeResBlock(width, width, tdim), _TimeResBlock(width, width, tdim)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.low = nn.ModuleList([_TimeResBlock(2 * width, 2 * width, tdim), _TimeResBlock(2 * width, 2 * width, tdim)])
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.merge = nn.ModuleList([_TimeResBlock(2 * width, width, tdim), _TimeResBlock(width, width, tdim)])
        self.out = nn.Sequential(make_norm("group", width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)        # starts as v = 0: the flow begins as the identity map
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(time_embedding(t, self.width))
        if self.condition is not None:
            if attrs is None:
                attrs = torch.full((x.shape[0], len(self.condition.names)), float("nan"), device=x.device)
            emb = emb + self.condition(attrs.to(x.device))
        elif attrs is not None:
            raise ValueError("attributes were given to an unconditional flow")
        h = self.inp(x)
        for block in self.high:
            h = block(h, emb)
        low = self.down(h)
        for block in self.low:
            low = block(low, emb)
        u = torch.cat([self.up(F.interpolate(low, scale_factor=2.0, mode="nearest")), h], dim=1)
        for block in self.merge:
            u = block(u, emb)
        return self.out(u)


class FlowLatentPrior(nn.Module):
    """A flow-matching prior over latents of shape `(D, h, w)`; its weights and standardisation are saved with the
    model's.

    Args:
        latent_shape: `(D, h, w)`, h and w even.
        width: the velocity network's width (see `VelocityNet`).
        ode_steps: Heun steps from noise to a latent when sampling (2 network calls each).
        conditions: attribute names of a conditional flow (see `VelocityNet`); empty: unconditional.
        guide: also hold `guide`, a second VelocityNet of the same shape that training fills with the flow's own
            weights from early in its training, for autoguidance (see `draw`); False: no guide.
    """

    def __init__(self, latent_shape: tuple[int, int, int], width: int = 64, ode_steps: int = 25,
                 conditions: tuple[str, ...] = (), guide: bool = False) -> None:
        super().__init__()
        d, h, w = latent_shape
        if h % 2 or w % 2:
            raise ValueError(f"the flow prior needs an even latent grid, got {h}x{w}")
        self.latent_shape = tuple(latent_shape)
        self.ode_steps = ode_steps
        self.net = VelocityNet(d, width, tuple(conditions))
        self.guide = VelocityNet(d, width, tuple(conditions)) if guide else None
        self.register_buffer("mean", torch.zeros(d, 1, 1))
        self.register_buffer("std", torch.ones(d, 1, 1))
        self.register_buffer("trained", torch.tensor(False))

    @torch.no_grad()
    def set_standardisation(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of the aggregate posterior of `(N, D, h, w)` posterior means and
        log-variances (the variance of z = mu + sigma * eps is var(mu) + E[sigma^2])."""
        self._check(mu, "mu")
        var = mu.double().var(dim=(0, 2, 3)) + logvar.double().exp().mean(dim=(0, 2, 3))
        self.mean.copy_(mu.double().mean(dim=(0, 2, 3)).reshape(-1, 1, 1))
        self.std.copy_(var.clamp_min(1e-12).sqrt().reshape(-1, 1, 1))

    def _check(self, z: torch.Tensor, name: str) -> None:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"{name} must be (N, {', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}")

    @property
    def condition(self) -> ConditionEmbedding | None:
        """The attributes' embedding of a conditional flow (with the bank of training rows); None otherwise."""
        return self.net.condition

    def loss(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
             attrs: torch.Tensor | None = None, time: str = "uniform") -> torch.Tensor:
        """Flow-matching loss (mean squared velocity error) on one batch of posteriors `(B, D, h, w)` each:
        z1 = mu + sigma * eps, standardised; z0 ~ N(0, I); `attrs` `(B, A)` the encoded attributes of a
        conditional flow (NaN = unknown); t ~ U(0, 1) (`time="uniform"`) or t = sigmoid(N(0, 1))
        (`"logit_normal"`, Esser et al. 2024: more of the training on the middle of the path, where the velocity
        is least determined by either end). A scalar."""
        self._check(mu, "mu")
        noise = torch.randn((2, *mu.shape), device=mu.device, generator=generator)
        z1 = (mu + noise[0] * torch.exp(0.5 * logvar) - self.mean) / self.std
        if time == "uniform":
            t = torch.rand(mu.shape[0], device=mu.device, generator=generator)
        elif time == "logit_normal":
            t = torch.sigmoid(torch.randn(mu.shape[0], device=mu.device, generator=generator))
        else:
            raise ValueError(f"time={time!r} is not one of ('uniform', 'logit_normal')")
        xt = torch.lerp(noise[1], z1, t[:, None, None, None])
        return F.mse_loss(self.net(xt, t, attrs), z1 - noise[1])

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None, attrs: torch.Tensor | None = None,
             guidance: float = 1.0, guidance_on: tuple[str, ...] = (), autoguidance: float = 1.0) -> torch.Tensor:
        """n latents `(n, D, h, w)` on the prior's device (the starting noise drawn on the generator's device).

        Args:
            attrs: `(n, A)` encoded attributes of a conditional flow (None: all unknown).
            guidance: classifier-free guidance weight w >= 1 given `attrs`: the velocity is v_hidden + w *
                (v_conditioned - v_hidden), "hidden" being `attrs` with the `guidance_on` attributes unknown
                (() = all). 1 = the conditioned velocity alone (one pass per evaluation, not two).
            autoguidance: autoguidance weight w >= 1 (Karras et al., "Guiding a diffusion model with a bad version
                of itself", NeurIPS 2024): the velocity is v_guide + w * (v - v_guide), v being the flow's
                (classifier-free guided, if `guidance` > 1) and v_guide the guide network's with the same
                attributes. The guide, an early snapshot of the same flow, makes the errors a less-trained flow
                makes; stepping away from it undoes part of the same errors in the trained one: sharper, more
                varied samples where the plain flow draws soft, blotchy ones (bench/RESULTS.md, session 15).
                The two guidances stack: were the guide the flow itself, this would be classifier-free guidance of
                weight 1 + w * (guidance - 1). 1 = off (no guide pass).

        Raises:
            RuntimeError: if the prior was never trained.
            ValueError: attributes for an unconditional flow, a guidance or autoguidance below 1, autoguidance
                without a guide network, or `guidance_on` naming an attribute the flow was not trained on.
        """
        if not bool(self.trained):
            raise RuntimeError("this VAE's flow prior (model.latent_prior='flow') has not been trained: train the "
                               "model to the end (train.prior_steps > 0)")
        if not guidance >= 1.0:
            raise ValueError(f"guidance={guidance!r} must be >= 1 (1 = no guidance)")
        if not autoguidance >= 1.0:
            raise ValueError(f"autoguidance={autoguidance!r} must be >= 1 (1 = no autoguidance)")
        if autoguidance != 1.0 and self.guide is None:
            raise ValueError(f"autoguidance={autoguidance!r} needs a guide network: this flow was built without one "
                             "(model.flow_guide=false)")
        if attrs is not None and self.condition is None:
            raise ValueError("attributes were given to an unconditional flow")
        device = self.mean.device
        noise_device = generator.device if generator is not None else device
        x = torch.randn((n, *self.latent_shape), generator=generator, device=noise_device).to(device)
        guided = attrs is not None and guidance != 1.0
        if attrs is not None:
            attrs = attrs.to(device)
            if guided:                                      # rows n.. see the guided attributes as unknown
                attrs = torch.cat([attrs, hide_for_guidance(self.condition.names, attrs, guidance_on)])

        def flow_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.net(x, t, attrs)
            cond, hidden = self.net(x.repeat(2, 1, 1, 1), t.repeat(2), attrs).chunk(2)
            return hidden + guidance * (cond - hidden)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = flow_velocity(x, t)
            if autoguidance == 1.0:
                return v
            v_guide = self.guide(x, t, None if attrs is None else attrs[:n])
            return v_guide + autoguidance * (v - v_guide)

        was_training = self.net.training
        self.net.eval()
        if self.guide is not None:
            self.guide.eval()
        dt = 1.0 / self.ode_steps
        for i in range(self.ode_steps):                                      # Heun: predictor + trapezoid corrector
            t0 = torch.full((n,), i * dt, device=device)
            v0 = velocity(x, t0)
            v1 = velocity(x + dt * v0, t0 + dt)
            x = x + 0.5 * dt * (v0 + v1)
        self.net.train(was_training)
        return x * self.std + self.mean
