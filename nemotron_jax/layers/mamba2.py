"""The Mamba-2 mixer of Nemotron 3 ('M' layers), spec section 2.

in_proj -> split [z | x | B | C | dt] -> causal depthwise conv1d (+bias) on xBC -> SiLU -> SSD scan
-> + D*x -> gated grouped RMSNorm with z -> out_proj. With a decode cache (layers/cache.py) a call continues
from the cached conv tail and SSM state: one token runs the one-step recurrence, several tokens the chunked
SSD from the cached state (or, with `index.keep_steps`, the state after every token, in closed form).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
from flax import nnx

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.cache import CacheIndex, MambaCache
from nemotron_jax.layers.common import Linear, Site, dtype_of, param
from nemotron_jax.layers.mlp import out_proj_std
from nemotron_jax.layers.norms import GatedGroupRMSNorm
from nemotron_jax.ops.activations import activation
from nemotron_jax.ops.causal_conv import causal_conv1d
from nemotron_jax.ops.ssd import ssd


def _init_a_log(key, h):
    # Megatron: A ~ U[1, 16], A_log = log(A).
    return jnp.log(jax.random.uniform(key, (h,), jnp.float32, 1.0, 16.0))


def _init_dt_bias(key, h, dt_min, dt_max, dt_floor):
    # dt = exp(U[log dt_min, log dt_max]) clamped >= floor; dt_bias = softplus^-1(dt) so softplus(dt_bias) = dt.
    u = jax.random.uniform(key, (h,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, site: Site = Site()):
        self.cfg = cfg
        h, p, g, n, k = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
        self.d_inner, self.conv_dim = cfg.mamba_d_inner, cfg.mamba_conv_dim
        pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        self.dtype = cdt
        self.act = activation(cfg.mamba_hidden_act)
        self.in_proj = Linear(cfg.hidden_size, cfg.mamba_in_proj_dim, axes=("embed", "mamba_in"), rngs=rngs,
                              std=cfg.initializer_range, use_bias=cfg.mamba_proj_bias, dtype=cdt, param_dtype=pdt,
                              **site.linear("mamba.in_proj", "in_proj"))
        # torch Conv1d default init: U(+-1/sqrt(fan_in)), fan_in = k for a depthwise conv.
        bound = 1.0 / math.sqrt(k)
        self.conv_weight = param(jax.random.uniform(rngs.params(), (k, self.conv_dim), pdt, -bound, bound),
                                 ("conv_kernel", "mamba_conv"))
        self.conv_bias = (param(jax.random.uniform(rngs.params(), (self.conv_dim,), pdt, -bound, bound), ("mamba_conv",),
                                decay=False)
                          if cfg.use_conv_bias else None)
        self.dt_bias = param(_init_dt_bias(rngs.params(), h, cfg.time_step_min, cfg.time_step_max,
                                           cfg.time_step_floor).astype(pdt), ("mamba_heads",), decay=False)
        self.A_log = param(_init_a_log(rngs.params(), h).astype(pdt), ("mamba_heads",), decay=False)
        self.D = param(jnp.ones((h,), pdt), ("mamba_heads",), decay=False)
        self.norm = GatedGroupRMSNorm(self.d_inner, groups=g, eps=cfg.layer_norm_epsilon, param_dtype=pdt)
        self.out_proj = Linear(self.d_inner, cfg.hidden_size, axes=("mamba_inner", "embed"), rngs=rngs,
                               std=out_proj_std(cfg), use_bias=cfg.mamba_proj_bias, dtype=cdt, param_dtype=pdt,
                               **site.linear("mamba.out_proj", "out_proj"))

    # -- pieces shared by the full-sequence path and the decode step
    def _split_in(self, zxbcdt):
        di, gn = self.d_inner, self.cfg.n_groups * self.cfg.ssm_state_size
        z, xbc, dt = jnp.split(zxbcdt, [di, 2 * di + 2 * gn], axis=-1)
        return z, xbc, dt

    def _split_xbc(self, xbc):
        c = self.cfg
        di, gn = self.d_inner, c.n_groups * c.ssm_state_size
        x, b, cc = jnp.split(xbc, [di, di + gn], axis=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, c.mamba_num_heads, c.mamba_head_dim),
                b.reshape(*lead, c.n_groups, c.ssm_state_size), cc.reshape(*lead, c.n_groups, c.ssm_state_size))

    def _dt(self, dt_raw):
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        lo, hi = self.cfg.time_step_limit
        if lo > 0.0 or math.isfinite(hi):
            dt = jnp.clip(dt, lo, hi)
        return dt

    def _A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    def _finish(self, y_bthp, x_bthp, z):
        y = y_bthp.astype(jnp.float32) + x_bthp.astype(jnp.float32) * self.D[...].astype(jnp.float32)[:, None]
        y = y.reshape(*y.shape[:-2], self.d_inner).astype(self.dtype)
        return self.out_proj(self.norm(y, z))

    def _conv_in(self, xbc_raw, segment_ids=None, history=None):
        conv_b = self.conv_bias[...] if self.conv_bias is not None else None
        y = causal_conv1d(xbc_raw, self.conv_weight[...], conv_b, segment_ids, history)
        return self.act(y.astype(jnp.float32)).astype(self.dtype)

    def __call__(self, u_btd: jax.Array, *, segment_ids: jax.Array | None = None, cache: MambaCache | None = None,
                 index: CacheIndex | None = None) -> tuple[jax.Array, MambaCache | None, None]:
        if cache is None:
            z, xbc_raw, dt_raw = self._split_in(self.in_proj(u_btd))
            x, b, c = self._split_xbc(self._conv_in(xbc_raw, segment_ids))
            y = ssd(x, self._dt(dt_raw), self._A(), b, c, chunk_size=self.cfg.chunk_size, segment_ids=segment_ids,
                    impl=self.cfg.ssd_impl)
            return self._finish(y, x, z), None, None
        if index.keep_steps:
            return self._steps(u_btd, cache)
        if u_btd.shape[1] == 1:
            y, cache = self.step(u_btd[:, 0], cache)
            return y[:, None], cache, None
        return self._chunk(u_btd, cache, index.valid)

    def _chunk(self, u_btd, cache: MambaCache, valid_b):
        """T tokens from the cache with the chunked SSD. Right padding (t >= valid[b]) gets dt = 0, so the state
        passes through it unchanged, and the new conv tail is read at each row's own end."""
        z, xbc_raw, dt_raw = self._split_in(self.in_proj(u_btd))
        hist = jnp.swapaxes(cache.conv, 1, 2)  # [b, k-1, conv_dim]
        x, b, c = self._split_xbc(self._conv_in(xbc_raw, history=hist))
        t = u_btd.shape[1]
        real = (jnp.arange(t)[None, :] < valid_b[:, None])[..., None]  # [b, t, 1]
        dt = jnp.where(real, self._dt(dt_raw), 0.0)
        y, state = ssd(x, dt, self._A(), b, c, chunk_size=self.cfg.chunk_size, initial_state=cache.ssm,
                       return_final_state=True, impl=self.cfg.ssd_impl)
        km1 = self.cfg.conv_kernel - 1
        xp = jnp.concatenate([hist, xbc_raw.astype(hist.dtype)], axis=1)  # [b, k-1+t, conv_dim]
        tail = jax.vmap(lambda r, v: jax.lax.dynamic_slice_in_dim(r, v, km1, axis=0))(xp, valid_b)
        return self._finish(y, x, z), MambaCache(jnp.swapaxes(tail, 1, 2), state.astype(cache.ssm.dtype)), None

    def _steps(self, u_btd, cache: MambaCache):
        """T tokens (a speculative verify: T is small) from the cache, returning the cache after EVERY token
        (step axis 1). Projections, conv and gate run once over all T; the state after token t is computed in
        closed form, S_t = e^{c_t} S_0 + sum_{s<=t} e^{c_t - c_s} dt_s x_s B_s^T with c_t = sum_{r<=t} dt_r A,
        an [T, T] decay matrix instead of T sequential steps (exact; the recurrence unrolled)."""
        c = self.cfg
        z, xbc_raw, dt_raw = self._split_in(self.in_proj(u_btd))
        t, km1 = u_btd.shape[1], c.conv_kernel - 1
        hist = jnp.swapaxes(cache.conv, 1, 2)  # [b, k-1, conv_dim]
        x, bb, cc = self._split_xbc(self._conv_in(xbc_raw, history=hist))  # [b,t,h,p], [b,t,g,n], [b,t,g,n]
        xp = jnp.concatenate([hist, xbc_raw.astype(hist.dtype)], axis=1)  # [b, k-1+t, conv_dim]
        tails = jnp.stack([xp[:, i + 1:i + 1 + km1] for i in range(t)], axis=1)  # conv tail after each token
        dt = self._dt(dt_raw)  # [b, t, h]
        cum = jnp.cumsum(dt * self._A(), axis=1)  # [b, t, h]
        causal = jnp.tril(jnp.ones((t, t), bool))
        seg = jnp.where(causal[None, :, :, None], cum[:, :, None, :] - cum[:, None, :, :], -jnp.inf)  # [b,t,s,h]
        rep = c.mamba_num_heads // c.n_groups
        b_h = jnp.repeat(bb.astype(jnp.float32), rep, axis=2)  # [b, t, h, n]
        c_h = jnp.repeat(cc.astype(jnp.float32), rep, axis=2)
        dx = dt[..., None] * x.astype(jnp.float32)  # [b, t, h, p]
        states = (jnp.exp(cum)[..., None, None] * cache.ssm.astype(jnp.float32)[:, None]
                  + jnp.einsum("btsh,bshp,bshn->bthpn", jnp.exp(seg), dx, b_h))  # [b, t, h, p, n]
        y = jnp.einsum("bthpn,bthn->bthp", states, c_h)
        out = self._finish(y, x, z)
        return out, MambaCache(jnp.swapaxes(tails, 2, 3), states.astype(cache.ssm.dtype)), None

    def init_cache(self, batch: int) -> MambaCache:
        c = self.cfg
        return MambaCache(jnp.zeros((batch, self.conv_dim, c.conv_kernel - 1), self.dtype),
                          jnp.zeros((batch, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size),
                                    dtype_of(c.mamba_ssm_cache_dtype)))

    def step(self, u_bd: jax.Array, cache: MambaCache) -> tuple[jax.Array, MambaCache]:
        """One token [b, d] -> output [b, d] and the updated cache (the SSD recurrence, one step)."""
        z, xbc_raw, dt_raw = self._split_in(self.in_proj(u_bd))
        window = jnp.concatenate([cache.conv, xbc_raw[:, :, None].astype(cache.conv.dtype)], axis=-1)  # [b, c, k]
        conv = jnp.einsum("bck,kc->bc", window.astype(jnp.float32), self.conv_weight[...].astype(jnp.float32))
        if self.conv_bias is not None:
            conv = conv + self.conv_bias[...].astype(jnp.float32)
        x, b, c = self._split_xbc(self.act(conv).astype(self.dtype))  # [b,h,p], [b,g,n], [b,g,n]
        dt = self._dt(dt_raw)  # [b, h]
        rep = self.cfg.mamba_num_heads // self.cfg.n_groups
        b_h = jnp.repeat(b.astype(jnp.float32), rep, axis=1)  # [b, h, n]
        c_h = jnp.repeat(c.astype(jnp.float32), rep, axis=1)
        decay = jnp.exp(dt * self._A())[:, :, None, None]
        s = decay * cache.ssm.astype(jnp.float32) + (dt[:, :, None] * x.astype(jnp.float32))[..., None] * b_h[:, :, None, :]
        y = jnp.einsum("bhpn,bhn->bhp", s, c_h)
        return self._finish(y, x, z), MambaCache(window[:, :, 1:], s.astype(cache.ssm.dtype))
