"""bitnet.GroupQueryAttention against a float64 numpy reference written from the definition
(rotate_half rotary, grouped heads, causal softmax over the cache), and against ONNX Runtime's
com.microsoft.GroupQueryAttention on the same inputs, for every kernel level this CPU has:
decode and prefill shapes, rows of different lengths in one batch, a right-padded first
prompt, packed and separate q/k/v, a shared past/present buffer (written in place) and
separate ones (copied), head sizes the AVX-512 twin takes and ones it leaves to the portable
kernel."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import custom_ops
from tests.kernel_levels import KERNEL_PARAMS

MS_DOMAIN = "com.microsoft"
POSITIONS = 2048


def attention_model(domain, heads, kv_heads, head_dim, packed=True, scale=None, declare_shapes=True,
                    cache=np.float32, rotary=True):
    """One GroupQueryAttention node with a `cache` (float32 or float16) KV cache; without
    `declare_shapes` no input has a declared shape, so ONNX Runtime passes any tensor to the
    op (which then has to refuse it itself)."""
    f32 = TensorProto.FLOAT
    kv_type = TensorProto.FLOAT16 if cache == np.float16 else f32
    hidden = (heads + 2 * kv_heads) * head_dim if packed else heads * head_dim

    def declared(shape):
        return shape if declare_shapes else None

    inputs = [helper.make_tensor_value_info("query", f32, declared(["B", "S", hidden]))]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f32, declared(["B", "S", kv_heads * head_dim])) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, kv_type, declared(["B", kv_heads, "P", head_dim]))
               for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, declared(["B"])),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, declared([])),
               helper.make_tensor_value_info("cos_cache", f32, declared([POSITIONS, head_dim // 2])),
               helper.make_tensor_value_info("sin_cache", f32, declared([POSITIONS, head_dim // 2]))]
    outputs = [helper.make_tensor_value_info("output", f32, None)]
    outputs += [helper.make_tensor_value_info(n, kv_type, None) for n in ("present_key", "present_value")]
    qkv = ["query", "", ""] if packed else ["query", "key", "value"]
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary), rotary_interleaved=0)
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("GroupQueryAttention",
                            qkv + ["past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                            ["output", "present_key", "present_value"], domain=domain, name="attention", **attrs)
    graph = helper.make_graph([node], "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def open_session(model, kernel=None, threads=2):
    if kernel is not None:
        os.environ["BITNET_KERNEL"] = kernel  # read when the library is registered
    try:
        return ort.InferenceSession(model, custom_ops.session_options(threads))
    finally:
        os.environ.pop("BITNET_KERNEL", None)


def rope_tables(head_dim, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(POSITIONS), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference(query, past_key, past_value, seqlens_k, total, cos, sin, heads, kv_heads, scale=None):
    """Float64 attention from the definition (new keys and values rounded to the cache's type
    first). Returns (output, present_key, present_value) and the number of valid cache
    positions per row."""
    stored = past_key.dtype
    B, S, hidden = query.shape
    D = hidden // (heads + 2 * kv_heads)
    scale = D ** -0.5 if scale is None else scale
    q = query[..., :heads * D].reshape(B, S, heads, D).astype(np.float64)
    k = query[..., heads * D:(heads + kv_heads) * D].reshape(B, S, kv_heads, D).astype(np.float64)
    v = query[..., (heads + kv_heads) * D:].reshape(B, S, kv_heads, D).astype(np.float64)
    capacity = max(past_key.shape[2], int(total))
    keys = np.zeros((B, kv_heads, capacity, D))
    values = np.zeros((B, kv_heads, capacity, D))
    keys[:, :, :past_key.shape[2]] = past_key
    values[:, :, :past_value.shape[2]] = past_value
    out = np.zeros((B, S, heads, D))
    first_prompt = S > 1 and S == int(total)
    lengths = []
    for b in range(B):
        tokens = int(seqlens_k[b]) + 1
        past = 0 if first_prompt else tokens - S
        valid = min(S, tokens) if first_prompt else S
        positions = past + np.arange(valid)
        c, s_ = cos[positions].astype(np.float64), sin[positions].astype(np.float64)
        keys[b, :, positions] = rotate_half(k[b, :valid], c[:, None], s_[:, None]).astype(stored)
        values[b, :, positions] = v[b, :valid].astype(stored)
        for i, pos in enumerate(positions):
            qr = rotate_half(q[b, i], c[i], s_[i])
            for h in range(heads):
                g = h // (heads // kv_heads)
                scores = keys[b, g, :pos + 1] @ qr[h] * scale
                p = np.exp(scores - scores.max())
                out[b, i, h] = p @ values[b, g, :pos + 1] / p.sum()
        lengths.append(past + valid)
    return out.reshape(B, S, heads * D), keys, values, lengths


def run(sess, query, past_key, past_value, seqlens_k, total, cos, sin, shared=True, split=None):
    """One run; with `shared` the past buffers are bound as the present outputs too (in place)."""
    binding = sess.io_binding()
    if split is None:
        binding.bind_cpu_input("query", query)
    else:
        q, k, v = split
        binding.bind_cpu_input("query", q)
        binding.bind_cpu_input("key", k)
        binding.bind_cpu_input("value", v)
    binding.bind_cpu_input("seqlens_k", seqlens_k)
    binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
    binding.bind_cpu_input("cos_cache", cos)
    binding.bind_cpu_input("sin_cache", sin)
    binding.bind_output("output", "cpu")
    if shared:
        for name, buffer in (("key", past_key), ("value", past_value)):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input("past_" + name, value)
            binding.bind_ortvalue_output("present_" + name, value)
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0], past_key, past_value
    binding.bind_cpu_input("past_key", past_key)
    binding.bind_cpu_input("past_value", past_value)
    binding.bind_output("present_key", "cpu")
    binding.bind_output("present_value", "cpu")
    sess.run_with_iobinding(binding)
    return tuple(binding.copy_outputs_to_cpu())


def case_inputs(rng, heads, kv_heads, D, S, lengths_before, capacity, first_prompt_lengths=None, cache=np.float32):
    B = len(lengths_before)
    query = rng.standard_normal((B, S, (heads + 2 * kv_heads) * D)).astype(np.float32)
    past_key = rng.standard_normal((B, kv_heads, capacity, D)).astype(cache)
    past_value = rng.standard_normal((B, kv_heads, capacity, D)).astype(cache)
    if first_prompt_lengths is not None:  # a right-padded first prompt: total = S
        seqlens = np.array([n - 1 for n in first_prompt_lengths], np.int32)
        total = S
    else:
        seqlens = np.array([n + S - 1 for n in lengths_before], np.int32)
        total = max(lengths_before) + S
    return query, past_key, past_value, seqlens, total


# (heads, kv heads, head size, new tokens S, cached lengths per row, first-prompt lengths)
CASES = [
    (20, 5, 128, 1, [0], None),            # 2B4T shape, first token
    (20, 5, 128, 1, [1300], None),         # decode over a long cache (chunks merged)
    (20, 5, 128, 1, [5, 700, 0, 64], None),  # a batch of rows at different lengths
    (20, 5, 128, 3, [40], None),           # 12 rows per KV head: the transposed tiles
    (20, 5, 128, 37, [0], None),           # a first prompt
    (20, 5, 128, 20, [150], None),         # a prefill chunk on top of a cache
    (8, 8, 64, 1, [90, 3], None),          # one query head per KV head
    (16, 2, 64, 5, [70, 9], None),         # 8 heads per KV head
    (4, 2, 32, 1, [33], None),             # a head size the AVX-512 twin leaves to the portable kernel
    (6, 3, 48, 9, [0, 0, 0], [9, 4, 1]),   # a right-padded first prompt, D = 48
    (4, 1, 24, 66, [10], None),            # D not a multiple of 16, tiles of 64 + 2 keys
]


@pytest.mark.parametrize("cache", [np.float32, np.float16], ids=["float32-cache", "float16-cache"])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("heads,kv_heads,D,S,lengths,first", CASES)
def test_matches_the_reference_and_onnxruntime(kernel, heads, kv_heads, D, S, lengths, first, cache):
    rng = np.random.default_rng(heads * 1000 + S * 10 + D)
    cos, sin = rope_tables(D)
    capacity = max(lengths) + S + 5
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, S, lengths, capacity, first, cache)
    expected, exp_k, exp_v, valid = reference(query, pk, pv, seqlens, total, cos, sin, heads, kv_heads)
    ours = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, cache=cache), kernel)
    out, keys, values = run(ours, query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
    assert keys.dtype == cache and values.dtype == cache
    # A float16 key is the float32 rotation rounded once: within one half ulp of the float64 one's.
    key_tolerance = 1e-5 if cache == np.float32 else 2 ** -10
    # ... and a key rounded the other way moves the scores by up to that much.
    out_tolerance = 2e-5 if cache == np.float32 else 5e-4
    rows = [slice(0, n) for n in (first or [S] * len(lengths))]
    for b, r in enumerate(rows):
        np.testing.assert_allclose(out[b, r], expected[b, r], rtol=out_tolerance, atol=out_tolerance)
        np.testing.assert_allclose(keys[b, :, :valid[b]], exp_k[b, :, :valid[b]], rtol=key_tolerance, atol=key_tolerance)
        np.testing.assert_array_equal(values[b, :, :valid[b]], exp_v[b, :, :valid[b]].astype(cache))
        # Cache positions past a row's length are not touched.
        np.testing.assert_array_equal(keys[b, :, valid[b]:], pk[b, :, valid[b]:])
    # What ORT's CPU kernel accepts: D a multiple of 16, no padded prompt, S > 1 only at batch 1.
    if cache == np.float32 and D % 16 == 0 and first is None and (S == 1 or len(lengths) == 1):
        theirs = open_session(attention_model(MS_DOMAIN, heads, kv_heads, D))
        ort_out, _, _ = run(theirs, query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
        np.testing.assert_allclose(out, ort_out, rtol=2e-5, atol=2e-5)


def test_separate_qkv_and_separate_buffers_match_packed_in_place():
    heads, kv_heads, D, S = 8, 2, 64, 4
    rng = np.random.default_rng(7)
    cos, sin = rope_tables(D)
    past_len = 30
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, S, [past_len], past_len + S + 6)
    packed = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D))
    out, keys, values = run(packed, query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
    split = (np.ascontiguousarray(query[..., :heads * D]), np.ascontiguousarray(query[..., heads * D:(heads + kv_heads) * D]),
             np.ascontiguousarray(query[..., (heads + kv_heads) * D:]))
    unpacked = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, packed=False))
    out2, _, _ = run(unpacked, query, pk.copy(), pv.copy(), seqlens, total, cos, sin, split=split)
    np.testing.assert_array_equal(out, out2)
    # An Optimum-style loop: past holds exactly the cached tokens, present comes back longer.
    out3, k3, v3 = run(packed, query, pk[:, :, :past_len].copy(), pv[:, :, :past_len].copy(), seqlens, total, cos, sin,
                       shared=False)
    assert k3.shape == (1, kv_heads, past_len + S, D)
    np.testing.assert_array_equal(out, out3)
    np.testing.assert_array_equal(k3, keys[:, :, :past_len + S])
    np.testing.assert_array_equal(v3, values[:, :, :past_len + S])


def test_without_rotary_the_heads_are_used_as_given():
    """do_rotary=0: no rotation (the cos/sin inputs are ignored), as ORT's kernel does it."""
    heads, kv_heads, D = 8, 2, 64
    rng = np.random.default_rng(9)
    cos, sin = rope_tables(D)
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, 3, [20], 30)
    identity = np.ones_like(cos), np.zeros_like(sin)
    expected, exp_k, _, _ = reference(query, pk, pv, seqlens, total, *identity, heads, kv_heads)
    ours = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, rotary=False))
    out, keys, _ = run(ours, query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(keys[:, :, :23], exp_k[:, :, :23], rtol=1e-6, atol=1e-6)
    theirs = open_session(attention_model(MS_DOMAIN, heads, kv_heads, D, rotary=False))
    ort_out, _, _ = run(theirs, query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
    np.testing.assert_allclose(out, ort_out, rtol=2e-5, atol=2e-5)


def test_scale_attribute_is_used():
    heads, kv_heads, D = 4, 2, 64
    rng = np.random.default_rng(3)
    cos, sin = rope_tables(D)
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, 1, [12], 20)
    expected, *_ = reference(query, pk, pv, seqlens, total, cos, sin, heads, kv_heads, scale=0.3)
    sess = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, scale=0.3))
    out, _, _ = run(sess, query, pk, pv, seqlens, total, cos, sin)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cache", [np.float32, np.float16], ids=["float32-cache", "float16-cache"])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_a_rows_bits_do_not_depend_on_the_batch_or_the_threads(kernel, cache):
    """A row's output is bit-identical alone and in a batch with rows of other lengths, on 1
    or 2 threads (the batcher's rows must not change each other)."""
    heads, kv_heads, D = 20, 5, 128
    rng = np.random.default_rng(11)
    cos, sin = rope_tables(D)
    lengths = [300, 17, 900, 0]
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, 1, lengths, 910, cache=cache)
    model = attention_model(custom_ops.DOMAIN, heads, kv_heads, D, cache=cache)
    together, _, _ = run(open_session(model, kernel, threads=2), query, pk.copy(), pv.copy(), seqlens, total, cos, sin)
    alone_session = open_session(model, kernel, threads=1)
    for b, n in enumerate(lengths):
        alone, _, _ = run(alone_session, query[b:b + 1], pk[b:b + 1].copy(), pv[b:b + 1].copy(), seqlens[b:b + 1],
                          n + 1, cos, sin)
        np.testing.assert_array_equal(together[b], alone[0])


@pytest.mark.parametrize("cache", [np.float32, np.float16], ids=["float32-cache", "float16-cache"])
@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("heads,kv_heads,D", [(20, 5, 128), (4, 2, 32)])
def test_prefill_in_any_chunks_gives_the_same_bits(kernel, heads, kv_heads, D, cache):
    """600 tokens appended at once, in chunks of 7, 33 or 256, or one at a time (decode): every
    query's output and the cache are the same bits (one summation order for every path)."""
    rng = np.random.default_rng(23)
    cos, sin = rope_tables(D)
    n = 600
    qkv = rng.standard_normal((1, n, (heads + 2 * kv_heads) * D)).astype(np.float32)
    sess = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, cache=cache), kernel)
    results = []
    for chunk in (n, 7, 33, 256, 1):
        keys = np.zeros((1, kv_heads, n, D), cache)
        values = np.zeros_like(keys)
        outs = []
        for start in range(0, n, chunk):
            part = qkv[:, start:start + chunk]
            end = start + part.shape[1]
            out, _, _ = run(sess, np.ascontiguousarray(part), keys, values, np.array([end - 1], np.int32), end, cos, sin)
            outs.append(out)
        results.append((np.concatenate(outs, axis=1), keys))
    for out, keys in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(keys, results[0][1])


@pytest.mark.parametrize("change,message", [
    (lambda f: f.update(seqlens_k=np.array([40], np.int32)), "does not fit"),
    (lambda f: f.update(query=f["query"][..., :-2]), "is not (num_heads + 2 kv_num_heads) times an even head size"),
    (lambda f: f.update(past_key=f["past_key"][:, :1]), "past_key and past_value must both be"),
    (lambda f: f.update(seqlens_k=np.array([3, 3], np.int32)), "one value per batch row"),
])
def test_bad_inputs_fail_with_a_clear_message(change, message):
    heads, kv_heads, D = 4, 2, 32
    rng = np.random.default_rng(5)
    cos, sin = rope_tables(D)
    query, pk, pv, seqlens, total = case_inputs(rng, heads, kv_heads, D, 1, [3], 8)
    feeds = dict(query=query, past_key=pk, past_value=pv, seqlens_k=seqlens,
                 total_sequence_length=np.array(total, np.int32), cos_cache=cos, sin_cache=sin)
    change(feeds)
    sess = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, declare_shapes=False))
    with pytest.raises(Exception, match="GroupQueryAttention node 'attention'") as err:
        sess.run(None, feeds)
    assert message in str(err.value)


def test_interleaved_rotary_is_refused_when_the_session_loads():
    proto = onnx.load_from_string(attention_model(custom_ops.DOMAIN, 4, 2, 32))
    for attr in proto.graph.node[0].attribute:
        if attr.name == "rotary_interleaved":
            attr.i = 1
    with pytest.raises(Exception, match="rotary_interleaved=1 is not supported"):
        open_session(proto.SerializeToString())


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_values_are_rounded_to_half_like_numpy(kernel):
    """A float16 cache stores each value rounded to nearest, ties to even, as numpy does: over
    ties, subnormals, the overflow edge, infinities and NaN."""
    heads, kv_heads, D = 2, 1, 64
    specials = np.array([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, np.inf, -np.inf,
                         2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 - 2.0 ** -25, 6.1e-5, -5.96e-8,
                         1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, 2048.5, 2049.0], np.float32)
    rng = np.random.default_rng(4)
    values = np.concatenate([specials, (rng.standard_normal(4 * D) * 10.0 ** rng.integers(-8, 5, 4 * D)).astype(np.float32)])
    values = values[:(len(values) // D) * D].reshape(-1, D)
    cos, sin = rope_tables(D)
    sess = open_session(attention_model(custom_ops.DOMAIN, heads, kv_heads, D, cache=np.float16), kernel)
    for row in values:
        query = np.zeros((1, 1, (heads + 2 * kv_heads) * D), np.float32)
        query[0, 0, (heads + kv_heads) * D:] = row
        keys = np.zeros((1, kv_heads, 4, D), np.float16)
        stored = np.zeros_like(keys)
        run(sess, query, keys, stored, np.array([0], np.int32), 1, cos, sin)
        with np.errstate(over="ignore"):  # numpy warns as it rounds past 65504 to inf
            np.testing.assert_array_equal(stored[0, 0, 0], row.astype(np.float16))
    nan = np.zeros((1, 1, (heads + 2 * kv_heads) * D), np.float32)
    nan[0, 0, (heads + kv_heads) * D] = np.nan
    stored = np.zeros((1, kv_heads, 4, D), np.float16)
    run(sess, nan, np.zeros_like(stored), stored, np.array([0], np.int32), 1, cos, sin)
    assert np.isnan(stored[0, 0, 0, 0])
