"""NemotronModel: embedding -> one pre-norm block per pattern character -> norm_f -> untied LM head (+ MTP)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import checkify

from nemotron_jax.config import ModelConfig
from nemotron_jax.layers.blocks import Block
from nemotron_jax.layers.cache import CacheIndex
from nemotron_jax.layers.common import Linear, QuantKey, Site, dtype_of, normal_init, param
from nemotron_jax.layers.norms import RMSNorm
from nemotron_jax.ops.ssd_chunked import segment_runs
from nemotron_jax.sharding import constrain, rules_of
from nemotron_jax.validate import as_token_array, check_segment_ids, check_tokens, checkify_tokens


class DecodeCache(NamedTuple):
    """The whole model's decode state: one pytree per batch (see layers/cache.py for the per-layer entries)."""

    layers: tuple  # per block of the main stack: AttnCache | MambaCache | None
    lengths: jax.Array  # [b] int32: tokens held per row
    mtp: tuple | None  # per layer of the MTP block (speculative drafting), or None


class ModelOutput(NamedTuple):
    logits: jax.Array  # [b, t, v] fp32
    hidden: jax.Array  # [b, t, d] final hidden states after norm_f (what the LM head and MTP read)
    moe_aux: tuple  # one aux dict per MoE layer of the main stack, in order
    mtp_logits: tuple  # per MTP depth k=1..D: [b, t, v], position i predicts token i+k+1
    mtp_moe_aux: tuple  # aux dicts of the MTP block's MoE layers, over all depths
    expert_loads: dict  # {MoE layer_idx: tokens per expert [e] int32}; a shared MTP layer sums over its depths


def shift_tokens(tokens_bt: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """tokens[:, i+k] at position i (fill past the end; all fill when k >= the sequence length)."""
    if k == 0:
        return tokens_bt
    tail = jnp.full((tokens_bt.shape[0], min(k, tokens_bt.shape[1])), fill, tokens_bt.dtype)
    return jnp.concatenate([tokens_bt[:, k:], tail], axis=1)


class NemotronModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        self.embeddings = param(normal_init(cfg.initializer_range)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
                                ("vocab", "embed"))
        # one rounding-key slot for every quantized GEMM (precision policies other than bf16)
        self.quant_key = QuantKey(None) if cfg.precision != "bf16" else None
        self.layers = nnx.List([Block(cfg, ch, rngs=rngs, layer_idx=i,
                                      site=Site(cfg, i, f"layers.{i}", self.quant_key))
                                for i, ch in enumerate(cfg.hybrid_override_pattern)])
        self.norm_f = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        # fp32 whatever the compute dtype: its wgrad reduces over every token (and MTP depth), and Nemotron 3
        # Ultra diverged when that reduction ran in bf16 and lost the small MTP contributions (spec section 3).
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs,
                              std=cfg.initializer_range, dtype=jnp.float32, param_dtype=pdt,
                              **Site(cfg, None, "", self.quant_key).linear("lm_head", "lm_head"))
        if cfg.mtp_enabled:
            from nemotron_jax.layers.mtp import MTPBlock  # noqa: PLC0415
            self.mtp = MTPBlock(cfg, rngs=rngs, quant_key=self.quant_key)
        else:
            self.mtp = None

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        # FSDP: gather the whole table before the lookup, as for any sharded weight; a lookup into a table sharded
        # along d would come out sharded along d, the wrong way for the blocks. The lookup stays in the table's
        # dtype (fp32 masters), so its gradient's scatter-add over repeated tokens accumulates in fp32.
        table = constrain(self.embeddings[...], (None, None))
        return jnp.take(table, tokens_bt, axis=0).astype(dtype_of(self.cfg.dtype))

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        return self.lm_head(hidden_btd).astype(jnp.float32)

    def forward(self, tokens_bt: jax.Array, *, segment_ids: jax.Array | None = None,
                mtp: bool | None = None, quant_key: jax.Array | None = None, checked: bool = False) -> ModelOutput:
        """Full forward. `mtp` (default: whether the config has MTP) also runs the MTP depths.

        `quant_key` feeds stochastic rounding in the backward pass of NVFP4 linears (precision="nvfp4");
        pass a fresh key every training step.

        tokens: a [batch, seq] integer array (a list of lists of ints is converted), no empty axis; anything else
        raises `nemotron_jax.validate.InputError` before tracing. Concrete ids outside [0, vocab_size) are refused
        the same way. Inside jit the ids cannot be read and are NOT checked: an id >= vocab_size gives NaN
        logits for its row, a negative id reads row vocab_size + id of the embedding. `checked=True` (under
        `jax.experimental.checkify.checkify`, as `nemotron_jax.model.checked_apply` does) compiles the range
        check in.
        """
        tokens_bt = check_tokens(tokens_bt, self.cfg.vocab_size)
        segment_ids = check_segment_ids(segment_ids, tokens_bt.shape)
        if segment_ids is not None:
            # a document is a run of equal ids ([0, 1, 0] is three): run indices make "same id" mean "same
            # document" for every mixer's mask (attention's included), not only for the SSD's
            segment_ids = segment_runs(segment_ids)
        if checked:
            checkify_tokens(tokens_bt, self.cfg.vocab_size)
        if quant_key is None or self.quant_key is None:
            return self._forward(tokens_bt, segment_ids, mtp)
        self.quant_key.set_value(quant_key)  # for this call only, like a stream drawn once per step
        try:
            return self._forward(tokens_bt, segment_ids, mtp)
        finally:
            self.quant_key.set_value(None)

    def _act(self, x_btd: jax.Array) -> jax.Array:
        """Block-boundary activations carry (batch, seq, embed) under the model's sharding rules."""
        return constrain(x_btd, ("batch", "seq", "embed"), rules_of(self.cfg))

    def _forward(self, tokens_bt, segment_ids, mtp) -> ModelOutput:
        x = self._act(self.embed(tokens_bt))
        moe_aux, loads = [], {}
        for i, blk in enumerate(self.layers):
            with jax.named_scope(f"layer{i}_{blk.kind}"):
                x, _, aux = _remat_block(self.cfg.remat, blk.kind)(blk, x, segment_ids)
                x = self._act(x)
            if aux is not None:
                moe_aux.append(aux)
                loads[blk.mixer.layer_idx] = aux["expert_counts"]
        hidden = self.norm_f(x)
        logits = self.logits(hidden)
        mtp_logits, mtp_aux = [], []
        run_mtp = self.mtp is not None if mtp is None else mtp
        if run_mtp:
            if self.mtp is None:
                raise ValueError("mtp=True but the config has no MTP block (num_nextn_predict_layers=0)")
            h = hidden
            for k in range(1, self.cfg.mtp_depths + 1):
                h, auxes, _ = self.mtp(h, self.embed(shift_tokens(tokens_bt, k)), segment_ids=segment_ids)
                mtp_logits.append(self.logits(h))
                mtp_aux.extend(auxes)
                for idx, aux in zip(self.mtp.moe_layer_indices, auxes):
                    loads[idx] = loads[idx] + aux["expert_counts"] if idx in loads else aux["expert_counts"]
        return ModelOutput(logits, hidden, tuple(moe_aux), tuple(mtp_logits), tuple(mtp_aux), loads)

    def update_router_biases(self, expert_loads: dict) -> None:
        """In place: the aux-loss-free bias update of every MoE layer from `ModelOutput.expert_loads`."""
        from nemotron_jax.layers.moe import update_router_biases  # noqa: PLC0415
        if expert_loads:
            update_router_biases(self, expert_loads)

    def __call__(self, tokens_bt: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        return self.forward(tokens_bt, segment_ids=segment_ids, mtp=False).logits

    # ------------------------------------------------------------------ cached inference
    def init_cache(self, batch: int, max_len: int, *, mtp: bool = False) -> DecodeCache:
        """An empty decode cache for `batch` rows of up to `max_len` tokens (the MTP block's too with `mtp`)."""
        if mtp and self.mtp is None:
            raise ValueError("init_cache(mtp=True): the config has no MTP block (num_nextn_predict_layers=0)")
        return DecodeCache(tuple(blk.init_cache(batch, max_len) for blk in self.layers),
                           jnp.zeros((batch,), jnp.int32),
                           self.mtp.init_cache(batch, max_len) if mtp else None)

    def extend(self, tokens_bt: jax.Array, cache: DecodeCache, *, valid: jax.Array | None = None,
               start: jax.Array | None = None, keep_steps: bool = False) -> tuple[jax.Array, DecodeCache]:
        """Run T tokens after each row's cached ones: (hidden [b, T, d] after norm_f, cache with lengths + valid).

        `valid` [b] (default T): real tokens per row; the rest is right padding that leaves no trace. With
        `keep_steps`, Mamba entries of the returned cache hold the state after every token (step axis 1) and
        `lengths` is not advanced: the caller picks the state to keep. `start` (default: lengths) is where the
        tokens are written; a sliced prefill gives every row the slice's offset, so rows whose prompt has ended
        (valid 0) write only past their end. Logits: `self.logits(hidden)`.
        """
        tokens_bt = check_tokens(tokens_bt, self.cfg.vocab_size)  # unchecked values inside jit: see forward
        b, t = tokens_bt.shape
        valid = jnp.full((b,), t, jnp.int32) if valid is None else jnp.asarray(valid).astype(jnp.int32)
        start = cache.lengths if start is None else jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
        index = CacheIndex(start, valid, keep_steps)
        x = self._act(self.embed(tokens_bt))
        new = []
        for i, (blk, c) in enumerate(zip(self.layers, cache.layers)):
            with jax.named_scope(f"layer{i}_{blk.kind}"):
                x, c, _ = blk(x, cache=c, index=index)
                x = self._act(x)
            new.append(c)
        lengths = cache.lengths if keep_steps else cache.lengths + valid
        return self.norm_f(x), DecodeCache(tuple(new), lengths, cache.mtp)

    def mtp_extend(self, h_btd: jax.Array, next_tokens_bt: jax.Array, mtp_cache: tuple, index: CacheIndex
                   ) -> tuple[jax.Array, tuple]:
        """One MTP depth over T positions with its own cache: (h^k [b, T, d], new MTP cache)."""
        h, _, mtp_cache = self.mtp(h_btd, self.embed(next_tokens_bt), cache=mtp_cache, index=index)
        return h, mtp_cache


def _call_block(blk, x_btd, segment_ids):
    return blk(x_btd, segment_ids=segment_ids)


_REMAT_POLICIES = {"block": None, "mamba_only": None,
                   "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _remat_block(mode: str, kind: str):
    """The block call of the training forward under `cfg.remat` (config.REMAT_MODES): plain, or a pure function
    of the block's state under jax.checkpoint, so that its backward recomputes the block's insides instead of
    keeping them. (The forward never writes the block's state, so nothing has to flow back out.)"""
    if mode == "none" or (mode == "mamba_only" and kind != "mamba"):
        return _call_block
    policy = _REMAT_POLICIES[mode]

    def call(blk, x_btd, segment_ids):
        graphdef, state = nnx.split(blk)
        pure = jax.checkpoint(lambda st, x, seg: _call_block(nnx.merge(graphdef, st), x, seg), policy=policy)
        return pure(state, x_btd, segment_ids)
    return call


def init_model(cfg: ModelConfig, seed: int = 0) -> NemotronModel:
    return NemotronModel(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> NemotronModel:
    """The model with ShapeDtypeStruct leaves: no memory is allocated (Ultra fits on a laptop)."""
    return nnx.eval_shape(lambda: NemotronModel(cfg, rngs=nnx.Rngs(0)))


def updated_router_biases(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, expert_loads: dict) -> nnx.State:
    """Pure form of `update_router_biases` for a jitted step: `rest` (the non-Param state) after the update."""
    model = nnx.merge(graphdef, params, rest)
    model.update_router_biases(expert_loads)
    return nnx.split(model, nnx.Param, ...)[2]


def apply(graphdef: nnx.GraphDef, state: nnx.State | tuple, tokens_bt: jax.Array, *,
          segment_ids: jax.Array | None = None, mtp: bool | None = None,
          quant_key: jax.Array | None = None, checked: bool = False) -> ModelOutput:
    """Pure-function boundary: graphdef and state (or a tuple of states) from nnx.split(model); jit this.

    Token ids are validated as in `NemotronModel.forward`: shape and dtype always (InputError before
    tracing), the values only when concrete. Under jit the values are unchecked (id >= vocab_size: NaN logits;
    negative id: wraps to row vocab_size + id); `checked=True` adds a `checkify.check` on them, to be run
    under `checkify.checkify` (`checked_apply` does both).
    """
    if quant_key is not None:  # set in the state before the merge: a merged model's variables may belong to an
        states = state if isinstance(state, tuple) else (state,)  # outer trace and cannot be mutated here
        state = tuple(with_quant_key(s, quant_key) for s in states)
    return merge(graphdef, state).forward(tokens_bt, segment_ids=segment_ids, mtp=mtp, checked=checked)


def checked_apply(graphdef: nnx.GraphDef, state: nnx.State | tuple, tokens_bt: jax.Array, *,
                  segment_ids: jax.Array | None = None, mtp: bool | None = None,
                  quant_key: jax.Array | None = None):
    """`apply` with the token-range check compiled in: (checkify.Error, ModelOutput). Jit it, then `err.throw()`:

        err, out = jax.jit(lambda s, t: M.checked_apply(graphdef, s, t))(state, tokens)
        err.throw()   # InputError-like JaxRuntimeError naming the first id outside [0, vocab_size)

    Costs one reduction over the tokens per call; the unchecked `apply` is what a training step should use.
    """
    def run(state, tokens_bt, segment_ids, quant_key):
        return apply(graphdef, state, tokens_bt, segment_ids=segment_ids, mtp=mtp, quant_key=quant_key, checked=True)

    if isinstance(tokens_bt, (list, tuple)):  # one array, not a pytree of Python ints, through checkify
        tokens_bt = as_token_array(tokens_bt)
    return checkify.checkify(run)(state, tokens_bt, segment_ids, quant_key)


def merge(graphdef: nnx.GraphDef, state: nnx.State | tuple) -> NemotronModel:
    """The model back from nnx.split's parts; `state` may be one State or a tuple of them."""
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def with_quant_key(state: nnx.State, key: jax.Array) -> nnx.State:
    """`state` with its QuantKey (if it holds the model's) set to `key`."""
    return jax.tree.map(lambda v: v.replace(key) if isinstance(v, QuantKey) else v, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
