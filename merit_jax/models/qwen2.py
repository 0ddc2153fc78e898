"""Qwen2 / Qwen2.5 decoder in Flax NNX, numerically the same as transformers' `Qwen2ForCausalLM`.

Shapes: B batch, T query length, S key length, D hidden, N query heads, K kv heads, H head dim,
F MLP hidden, V vocab. Kernels are stored [in, out] (HF stores [out, in]; the converter transposes).
Every parameter carries its logical axes (`merit_jax.sharding.LOGICAL_RULES` maps them to the mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from merit_jax.models import attention
from merit_jax.models.config import ModelConfig
from merit_jax.sharding import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    param_dtype: Any = jnp.float32  # master weights
    compute_dtype: Any = jnp.float32  # matmuls and activations
    remat: str = "none"  # none | full | dots
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: xla | cudnn | splash
    scan_layers: bool = False  # run the stacked blocks through one lax.scan (`scan_blocks`), not unrolled
    max_segments: int = 16  # attention=cudnn: segments (examples, padding) per packed row it tells apart


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = 0.02) -> nnx.Param:
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale if scale
             else jnp.ones(shape, jnp.float32) if scale is None else jnp.zeros(shape, jnp.float32))
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out] in param dtype, applied in compute dtype."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool, policy: DTypePolicy,
                 rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, policy.param_dtype)
        self.bias = _param(rngs, (d_out,), axes[1:], policy.param_dtype, scale=0.0) if bias else None
        self.dtype = policy.compute_dtype

    def __call__(self, x: Array) -> Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y + self.bias[...].astype(self.dtype) if self.bias is not None else y


class RMSNorm(nnx.Module):
    """Normalised in fp32 (as HF does), scaled after casting back to the input dtype."""

    def __init__(self, dim: int, eps: float, policy: DTypePolicy):
        self.scale = nnx.Param(jnp.ones((dim,), policy.param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(positions_bt: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [B, T, H] for integer positions (HF's half-split layout: frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_btnh: Array, cos_bth: Array, sin_bth: Array) -> Array:
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x_btnh * cos + rotated * sin).astype(x_btnh.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with q/k/v biases; RoPE applied by the caller-provided cos/sin."""

    def __init__(self, arch: ModelConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        n, k, h, d = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
        self.q_proj = Linear(d, n * h, ("embed", "heads"), bias=True, policy=policy, rngs=rngs)
        self.k_proj = Linear(d, k * h, ("embed", "kv_heads"), bias=True, policy=policy, rngs=rngs)
        self.v_proj = Linear(d, k * h, ("embed", "kv_heads"), bias=True, policy=policy, rngs=rngs)
        self.o_proj = Linear(n * h, d, ("heads", "embed"), bias=False, policy=policy, rngs=rngs)
        self.n, self.k, self.h = n, k, h
        self.kernel, self.max_segments = policy.attention, policy.max_segments  # kernel: xla | cudnn | splash

    def __call__(self, x_btd: Array, cos_bth: Array, sin_bth: Array, mask_b1ts: Array,
                 cache: dict | None = None) -> tuple[Array, dict | None]:
        """`mask_b1ts`: bool [B, 1, T, S], or (model.attention = splash | cudnn) the rows' segment ids [B, T]."""
        b, t, _ = x_btd.shape
        q_btnh = apply_rope(self.q_proj(x_btd).reshape(b, t, self.n, self.h), cos_bth, sin_bth)
        k_btkh = apply_rope(self.k_proj(x_btd).reshape(b, t, self.k, self.h), cos_bth, sin_bth)
        v_btkh = self.v_proj(x_btd).reshape(b, t, self.k, self.h)
        q_btnh = constrain(q_btnh, ("batch", "seq", "act_heads", None))
        if cache is not None:  # decode: write this step's keys/values at `index`, attend over the cache
            idx = cache["index"]
            k_btkh = jax.lax.dynamic_update_slice(cache["k"], k_btkh.astype(cache["k"].dtype), (0, idx, 0, 0))
            v_btkh = jax.lax.dynamic_update_slice(cache["v"], v_btkh.astype(cache["v"].dtype), (0, idx, 0, 0))
            cache = {"k": k_btkh, "v": v_btkh, "index": idx}
        k_btkh, v_btkh = k_btkh.astype(q_btnh.dtype), v_btkh.astype(q_btnh.dtype)
        if mask_b1ts.ndim == 2 and self.kernel == "cudnn":  # segment ids: no [T, S] scores or mask
            out_btnh = attention.cudnn_attention(q_btnh, k_btkh, v_btkh, mask_b1ts, self.max_segments)
        elif mask_b1ts.ndim == 2 and attention.supported(t):
            out_btnh = attention.splash_attention(q_btnh, k_btkh, v_btkh, mask_b1ts)
        else:  # the reference; also decoding (one query against the cache) with any kernel setting
            mask = attention.dense_mask(mask_b1ts) if mask_b1ts.ndim == 2 else mask_b1ts
            out_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask)
        return self.o_proj(out_btnh.reshape(b, t, self.n * self.h)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, arch: ModelConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        d, f = arch.hidden_size, arch.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=False, policy=policy, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=False, policy=policy, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=False, policy=policy, rngs=rngs)

    def __call__(self, x_btd: Array) -> Array:
        h_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        return self.down_proj(constrain(h_btf, ("batch", "seq", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, arch: ModelConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, policy)
        self.self_attn = Attention(arch, policy, rngs)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, policy)
        self.mlp = MLP(arch, policy, rngs)

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts, cache=None):
        attn_btd, cache = self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, mask_b1ts, cache)
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, ("batch", "seq", "act_embed")), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def stack_layers(xs: tuple[Array, ...], logical_axes: tuple | None) -> Array:
    """jnp.stack(xs), sharded as one layer's parameter (`logical_axes`) is, on a new unsharded leading axis.

    Its gradient comes back as one separate array per layer: each slice of the stacked cotangent is
    materialised (an optimisation barrier), so that what consumes a layer's gradient (the optimizer's update)
    does not fuse the slice at that layer's offset. Fused, every layer's update is a kernel of its own, which
    the TPU compiler generates one by one (7B: minutes); unfused, the layers' updates are the same kernel.
    The cotangent is not constrained: under extraction's vmap over examples it carries their axis."""
    x_l = jnp.stack(xs)
    return x_l if logical_axes is None else constrain(x_l, (None, *logical_axes))


def _stack_fwd(xs, logical_axes):
    return stack_layers(xs, logical_axes), None


def _stack_bwd(logical_axes, _, g_l):
    return (tuple(jax.lax.optimization_barrier(g_l[i]) for i in range(g_l.shape[0])),)


stack_layers.defvjp(_stack_fwd, _stack_bwd)


def scan_blocks(blocks, x, step, *, dtype, remat: str = "none", per_block=None):
    """x after `step(block, x, per_block[i]) -> x` for every block in turn, as one `lax.scan`: the program
    holds one block, so its size and compile time do not grow with depth.

    The blocks keep their own parameters (names, checkpoints and gradients stay per block); the scan runs over
    a copy stacked on a new leading axis at call time, cast to the compute `dtype` first (a bf16 stack under
    bf16 compute: the blocks cast their weights to it anyway, so the results are the same), sharded as the
    blocks' parameters are. Gradients flow back through the stack to each block's parameters. `remat` is
    applied to each step (jax.checkpoint), as the unrolled loop applies it to each block.
    """
    if not len(blocks):
        return x
    graphdef = nnx.graphdef(blocks[0])

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("logical_axes")
        return vs[0].replace(stack_layers(tuple(v[...].astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
                                                else v[...] for v in vs), None if axes is None else tuple(axes)))

    stacked = jax.tree.map(stack, *(nnx.state(b) for b in blocks), is_leaf=lambda v: isinstance(v, nnx.Variable))

    def body(x, xs):
        state, extra = xs
        return step(nnx.merge(graphdef, state), x, extra), None

    if remat != "none":  # prevent_cse=False: the scan already keeps XLA from merging the recomputation away
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, (stacked, per_block))[0]


def make_attention_mask(positions_bt: Array, segment_ids_bt: Array | None, key_valid_bs: Array | None,
                   key_positions_bs: Array | None = None) -> Array:
    """bool [B, 1, T, S]: causal by position, same segment, valid key."""
    kpos = positions_bt if key_positions_bs is None else key_positions_bs
    mask = kpos[:, None, :] <= positions_bt[:, :, None]
    if segment_ids_bt is not None:
        mask &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    if key_valid_bs is not None:
        mask &= key_valid_bs[:, None, :].astype(bool)
    return mask[:, None]


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, policy: DTypePolicy, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (vocab, dim), ("vocab", "embed"), policy.param_dtype)

    def __call__(self, ids_bt: Array) -> Array:
        return jnp.take(self.embedding[...], ids_bt, axis=0)

    def attend(self, x_btd: Array) -> Array:
        return x_btd @ self.embedding[...].astype(x_btd.dtype).T


class Qwen2Model(nnx.Module):
    def __init__(self, arch: ModelConfig, policy: DTypePolicy, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, policy, rngs)
        self.layers = nnx.List([DecoderLayer(arch, policy, rngs) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, policy)
        self.arch, self.policy = arch, policy

    def __call__(self, input_ids_bt, positions_bt, mask_b1ts, caches=None, inputs_embeds_btd=None):
        x_btd = self.embed_tokens(input_ids_bt) if inputs_embeds_btd is None else inputs_embeds_btd
        x_btd = constrain(x_btd.astype(self.policy.compute_dtype), ("batch", "seq", "act_embed"))
        if isinstance(positions_bt, (tuple, list)) or positions_bt.ndim != 2:
            cos, sin = positions_bt  # precomputed (multimodal RoPE): a (cos, sin) pair, or them stacked
        else:
            cos, sin = rope_cos_sin(positions_bt, self.arch.head_dim, self.arch.rope_theta)
        cos, sin = cos.astype(self.policy.compute_dtype), sin.astype(self.policy.compute_dtype)
        if self.policy.scan_layers and caches is None:  # decoding (KV caches) stays unrolled: no gradients,
            # and each layer's cache would have to be stacked and unstacked around the scan
            x_btd = scan_blocks(self.layers, x_btd, lambda layer, x, _: layer(x, cos, sin, mask_b1ts)[0],
                                dtype=self.policy.compute_dtype, remat=self.policy.remat)
            return self.norm(x_btd), None
        new_caches = []
        remat = self.policy.remat != "none" and caches is None  # decoding never needs gradients
        if remat:
            layer_fn = nnx.remat(lambda lyr, *a: lyr(*a), policy=_REMAT_POLICIES[self.policy.remat])
        for i, layer in enumerate(self.layers):
            if remat:
                x_btd, _ = layer_fn(layer, x_btd, cos, sin, mask_b1ts)
            else:
                x_btd, c = layer(x_btd, cos, sin, mask_b1ts, None if caches is None else caches[i])
                new_caches.append(c)
        return self.norm(x_btd), (new_caches if caches is not None else None)


def make_policy(param_dtype, compute_dtype, remat: str, attention: str, scan_layers: bool,
                max_segments: int = 16) -> DTypePolicy:
    if remat not in ("none", *_REMAT_POLICIES):
        raise ValueError(f"model.remat={remat!r}: expected one of none, {', '.join(_REMAT_POLICIES)}")
    return DTypePolicy(jnp.dtype(param_dtype), jnp.dtype(compute_dtype), remat, attention, bool(scan_layers),
                       int(max_segments))


class Qwen2ForCausalLM(nnx.Module):
    """input_ids [B, T] -> logits float32 [B, T, V]."""

    def __init__(self, arch: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, remat: str = "none", attention: str = "xla",
                 scan_layers: bool = False, max_segments: int = 16):
        policy = make_policy(param_dtype, compute_dtype, remat, attention, scan_layers, max_segments)
        self.config, self.policy = arch, policy
        self.model = Qwen2Model(arch, policy, rngs)
        self.lm_head = (None if arch.tie_word_embeddings else
                        Linear(arch.hidden_size, arch.vocab_size, ("embed", "vocab"), bias=False, policy=policy,
                               rngs=rngs))

    def logits(self, h_btd: Array) -> Array:
        h_btd = h_btd.astype(self.policy.compute_dtype)
        out = self.model.embed_tokens.attend(h_btd) if self.lm_head is None else self.lm_head(h_btd)
        return constrain(out.astype(jnp.float32), ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 attention_mask: Array | None = None) -> Array:
        """Full-sequence forward. `attention_mask` [B, T] (1 = real token) or packed `segment_ids` [B, T]."""
        return self.logits(self.hidden(input_ids, positions, segment_ids, attention_mask))

    def hidden(self, input_ids: Array, positions: Array | None = None, segment_ids: Array | None = None,
               attention_mask: Array | None = None) -> Array:
        """The final hidden states h [B, T, D] (what `logits` maps to the vocabulary): losses over a large
        vocabulary compute the logits from them a chunk at a time (merit_jax.losses.chunked_token_ce)."""
        positions, mask = self.prepare(input_ids, positions, segment_ids, attention_mask)
        if self.policy.attention in ("splash", "cudnn"):  # kernels take segment ids (0: padding), never [T, S]
            mask = segment_ids if segment_ids is not None else (
                attention_mask if attention_mask is not None else jnp.ones(input_ids.shape, jnp.int32))
        h_btd, _ = self.model(input_ids, positions, mask)
        return h_btd

    @staticmethod
    def prepare(input_ids, positions, segment_ids, attention_mask):
        """Default positions (counting real tokens only, as HF generate does) and the attention mask."""
        b, t = input_ids.shape
        if positions is None:
            if attention_mask is not None:
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        order_bt = jnp.broadcast_to(jnp.arange(t), (b, t))  # causality is by index, not by position id
        mask = make_attention_mask(order_bt, segment_ids, attention_mask)
        return positions.astype(jnp.int32), mask

