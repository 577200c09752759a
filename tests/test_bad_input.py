"""Bad input to the model's public entry points gets one clear InputError before anything compiles.

Covers NemotronModel.forward / __call__ / extend, model.apply (eager and under jit), model.checked_apply
(checkify inside jit), inference.engine.prefill and generate's prompt checks. The data path (corpus files) is in
tests/data/test_corpus.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemotron_jax import model as M
from nemotron_jax.config import ModelConfig
from nemotron_jax.inference import engine as E
from nemotron_jax.validate import InputError

V = 256


@pytest.fixture(scope="module")
def net():
    return M.init_model(ModelConfig.tiny(hybrid_override_pattern="M*E"), seed=0)


def _entry_points(net):
    """name -> fn(tokens): every public entry point that takes a [batch, seq] token array."""
    graphdef, state = nnx.split(net)
    return {
        "forward": lambda t: net.forward(t),
        "__call__": lambda t: net(t),
        "apply": lambda t: M.apply(graphdef, state, t),
        "checked_apply": lambda t: M.checked_apply(graphdef, state, t),
        "extend": lambda t: net.extend(t, net.init_cache(1, 256)),
        "prefill": lambda t: E.prefill((graphdef, state), t, _lengths(t), max_len=256),
    }


def _lengths(t):
    """Full-row lengths for a [b, P] token array; anything else gets [1] (prefill refuses the tokens first)."""
    try:
        shape = np.shape(t)
    except ValueError:  # ragged
        return np.ones((1,), np.int32)
    return np.full((shape[0],), shape[1], np.int32) if len(shape) == 2 else np.ones((1,), np.int32)


ENTRY_POINTS = ["forward", "__call__", "apply", "checked_apply", "extend", "prefill"]


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad, pos", [(300, (0, 1)), (V, (0, 1)), (-1, (0, 1))])
def test_out_of_range_token_id_is_refused(net, entry, bad, pos):
    """Measured before: id 300 gave 100% NaN logits, id -1 silently read the last embedding row."""
    toks = np.array([[5, bad, 7]], np.int32)
    with pytest.raises(InputError) as e:
        _entry_points(net)[entry](toks)
    msg = str(e.value)
    assert "tokens" in msg and f"{bad} at {pos}" in msg and f"vocab_size={V}" in msg and f"[0, {V})" in msg, msg


def test_many_bad_ids_are_counted_and_the_first_few_listed(net):
    toks = np.arange(300, 310, dtype=np.int32)[None]
    with pytest.raises(InputError, match=r"tokens: 10 token id\(s\) outside .*300 at \(0, 0\).*\(and 5 more\)"):
        net(toks)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0)])
def test_empty_batch_or_zero_length_is_refused(net, entry, shape):
    """Measured before: (0, 16) raised ZeroDivisionError, (2, 0) a numpy reduction error."""
    with pytest.raises(InputError, match=rf"is empty: shape \({shape[0]}, {shape[1]}\)"):
        _entry_points(net)[entry](jnp.zeros(shape, jnp.int32))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("toks, words", [
    (jnp.ones((1, 3), jnp.float32), "got dtype float32"),
    (np.ones((1, 3), np.float64), "got dtype float64"),
    (np.ones((1, 3), bool), "got dtype bool"),
    (np.arange(4, dtype=np.int32), r"got shape \(4,\); add a batch axis"),
    (np.zeros((1, 2, 3), np.int32), r"got shape \(1, 2, 3\)"),
    ([[1, 2], [3]], "ragged list"),
    ("hello", "got str"),
    (7, "got int"),
    ([[1.0, 2.0]], "got dtype float64"),
])
def test_non_token_arrays_are_refused(net, entry, toks, words):
    """Floats, bools, wrong ranks, ragged lists, strings: refused by name (measured before: a list raised
    AttributeError: 'list' object has no attribute 'ndim')."""
    with pytest.raises(InputError, match=words):
        _entry_points(net)[entry](toks)


def test_python_lists_of_ints_are_accepted(net):
    """Converted with np.asarray, then checked like an array (traced only here: what runs is the numpy path)."""
    out = jax.eval_shape(lambda: net([[1, 2, 3, 4]]))
    assert out.shape == (1, 4, V)
    graphdef, state = nnx.split(net)
    err, out = jax.eval_shape(lambda s: M.checked_apply(graphdef, s, [[1, 2, 3, 4]]), state)
    assert out.logits.shape == (1, 4, V)
    with pytest.raises(InputError, match=r"300 at \(0, 1\)"):
        net([[1, 300]])


def test_segment_ids_must_match_the_tokens(net):
    toks = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(InputError, match=r"segment_ids must have the tokens' shape \(1, 4\), got \(1, 3\)"):
        net(toks, segment_ids=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(InputError, match="segment_ids must hold integers"):
        net(toks, segment_ids=jnp.zeros((1, 4), jnp.float32))


def test_shape_and_dtype_errors_come_while_tracing_under_jit(net):
    """Inside jit the shapes are static: the same InputError comes at trace time, before XLA compiles."""
    graphdef, state = nnx.split(net)
    f = jax.jit(lambda s, t: M.apply(graphdef, s, t).logits)
    with pytest.raises(InputError, match="is empty"):
        f.trace(state, jnp.zeros((0, 8), jnp.int32))  # tracing alone raises it
    with pytest.raises(InputError, match="got dtype float32"):
        f(state, jnp.zeros((1, 8), jnp.float32))


def test_checked_apply_catches_bad_ids_inside_jit_and_unchecked_behaviour_is_as_documented(net):
    """Under jit the values are tracers: plain apply cannot read them. checked_apply compiles a checkify check
    in; err.throw() names the count, the first bad id and its index. The logits that come back alongside show
    the unchecked behaviour the docstrings state: id >= vocab_size gives NaN logits (its row), a negative id wraps."""
    graphdef, state = nnx.split(net)
    f = jax.jit(lambda s, t: M.checked_apply(graphdef, s, t))
    err, out = f(state, jnp.array([[3, 300, 4], [-1, 9, 9]], jnp.int32))
    with pytest.raises(Exception, match=r"tokens: 2 token id\(s\) outside the vocabulary \[0, 256\) "
                                        r"\(vocab_size=256\); the first is 300 at flat index 1"):
        err.throw()
    logits = np.asarray(out.logits)
    assert np.isnan(logits[0]).all()  # the whole row: the chunked Mamba scan spreads the NaN within its chunk
    err_ok, out_ok = f(state, jnp.array([[3, 5, 4], [V - 1, 9, 9]], jnp.int32))
    err_ok.throw()  # in range: no error
    assert err_ok.get() is None
    np.testing.assert_array_equal(logits[1], np.asarray(out_ok.logits)[1])  # -1 read row 255, silently
    assert f._cache_size() == 1


def test_prefill_checks_lengths(net):
    gd_st = nnx.split(net)
    toks = np.ones((2, 4), np.int32)
    for lengths, words in [([4], r"must be \[batch\] = \(2,\)"), ([4, 0], r"lengths_b\[1\]=0 is outside \[1, 4\]"),
                           ([5, 4], r"lengths_b\[0\]=5"), ([4.0, 4.0], "must hold integers")]:
        with pytest.raises(InputError, match=words):
            E.prefill(gd_st, toks, np.asarray(lengths), max_len=256)


@pytest.mark.parametrize("prompts, words", [
    ("hello", "got str"),
    (5, "got int"),
    (["hello"], "prompt 0: expected a sequence of token ids, got str"),
    ([[True, False]], "must be integers, got dtype bool"),
    ([[1, [2, 3]]], "prompt 0: expected a flat sequence"),
    ([[1, 2], [3, 256]], r"prompt 1: token id 256 at position 1 is outside the vocabulary \[0, 256\) "
                         r"\(vocab_size=256\)"),
])
def test_generate_refuses_bad_prompts_before_compiling(net, prompts, words):
    with pytest.raises(InputError, match=words):
        E.generate(net, prompts, max_new_tokens=4)


# ----------------------------------------------------------------------------------------------- data path: tokenizers
def test_tokenizers_refuse_non_text_and_non_integer_ids():
    from nemotron_jax.data.tokenizer import ByteTokenizer  # noqa: PLC0415

    tok = ByteTokenizer()
    with pytest.raises(TypeError, match=r"encode: text must be a str, got bytes \(decode bytes to str first"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str|text must be a str, got NoneType"):
        tok.encode_batch(["ok", None])
    with pytest.raises(ValueError, match="must be integers, got dtype float64"):
        tok.decode([104.7, 105.2])
    assert tok.decode([]) == ""
