"""Transformer building blocks of the OpenAI CLIP architecture (pre-LN residual blocks).

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis names
(`embed`, `mlp`, `heads`, `kv`, ...). Only `parallel/mesh.py` maps those names to mesh axes; model code
never mentions a device or a mesh.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# open_clip / OpenAI CLIP use LayerNorm eps 1e-5 (Flax's default is 1e-6).
LAYER_NORM_EPS = 1e-5


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries the given logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def quick_gelu(x: Array) -> Array:
    """OpenAI's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: Array) -> Array:
    """erf GELU, as torch nn.GELU(); jax's default tanh approximation differs by ~5e-4."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(name: str, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def take_rows(x: Array, rows: int | Array) -> Array:
    """x [B, L, ...] -> [B, 1, ...]: position `rows` (an int) or `rows[b]` ([B] ints) of each sequence."""
    if isinstance(rows, int):
        return x[:, rows : rows + 1]
    return jnp.take_along_axis(x, rows.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


class MultiHeadAttention(nn.Module):
    """Self-attention with separate q/k/v projections ([embed, heads, kv] kernels).

    Separate projections (instead of torch's fused in_proj) keep the head axis explicit for tensor
    parallelism; the converters split/fuse torch's `in_proj_weight` exactly.
    """

    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        head_dim = self.width // self.heads
        std = self.width**-0.5
        projection = functools.partial(
            nn.DenseGeneral,
            features=(self.heads, head_dim),
            axis=-1,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(std), ("embed", "heads", "kv")),
            bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")),
        )
        self.query = projection(name="query")
        self.key = projection(name="key")
        self.value = projection(name="value")
        self.out = nn.DenseGeneral(
            features=self.width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(std), ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="out",
        )

    def _softmax_weights(self, a: Array, b: Array, mask: Array | None) -> Array:
        """mask: [q, k] or [B, q, k] bool (True = attend) or None."""
        scale = a.shape[-1] ** -0.5
        # Logits and softmax in float32 whatever the compute dtype: bf16 softmax loses the tail.
        logits = jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask[:, None] if mask.ndim == 3 else mask, logits, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Standard attention; `mask` [q, k] bool (True = attend) or None."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = self._softmax_weights(q, k, mask).astype(self.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))

    def attend_rows(self, x: Array, rows: int | Array, mask: Array | None = None) -> Array:
        """The attention output at one query position per sequence: x [B, L, D], rows an int (the same
        position everywhere) or [B] ints, mask [L, L] or None -> [B, 1, D]; equal to
        `__call__(x, mask)[b, rows[b]]` (keys and values from every position; the query, its softmax and
        the output projection for that row only)."""
        q = self.query(take_rows(x, rows))
        row_mask = None if mask is None else take_rows(jnp.broadcast_to(mask, x.shape[:1] + mask.shape), rows)
        weights = self._softmax_weights(q, self.key(x), row_mask).astype(self.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, self.value(x)))

    def self_self(self, x: Array) -> Array:
        """FarSLIP/SegEarth's q-q + k-k + v-v attention (dense features; no mask)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = sum(self._softmax_weights(t, t, None) for t in (q, k, v)).astype(self.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class MLP(nn.Module):
    width: int
    mlp_ratio: float
    quick_gelu: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = int(self.width * self.mlp_ratio)
        x = nn.Dense(
            hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal((2 * self.width) ** -0.5), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            name="c_fc",
        )(x)
        x = quick_gelu(x) if self.quick_gelu else exact_gelu(x)
        return nn.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(self.width**-0.5), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="c_proj",
        )(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    width: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.ln_1 = layer_norm("ln_1", self.dtype, self.param_dtype)
        self.attn = MultiHeadAttention(self.width, self.heads, self.dtype, self.param_dtype, name="attn")
        self.ln_2 = layer_norm("ln_2", self.dtype, self.param_dtype)
        self.mlp = MLP(self.width, self.mlp_ratio, self.quick_gelu, self.dtype, self.param_dtype, name="mlp")

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def rows(self, x: Array, rows: int | Array, mask: Array | None = None) -> Array:
        """The block's output at one position per sequence: x [B, L, D], rows an int or [B] ints -> [B, D];
        equal to `__call__(x, mask)[b, rows[b]]` at about a sixth of the cost (only keys and values need
        every position)."""
        row = take_rows(x, rows)
        row = row + self.attn.attend_rows(self.ln_1(x), rows, mask)
        return (row + self.mlp(self.ln_2(row)))[:, 0]

    def segearth(self, x: Array) -> Array:
        """FarSLIP's "SegEarth" last layer for patch tokens: self-self attention, no residual, no MLP."""
        return self.attn.self_self(self.ln_1(x))


class Transformer(nn.Module):
    """A stack of blocks named `resblocks_{i}`; optionally rematerialised per block."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        block_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        self.resblocks = [
            block_cls(
                self.width, self.heads, self.mlp_ratio, self.quick_gelu, self.dtype, self.param_dtype,
                name=f"resblocks_{i}",
            )
            for i in range(self.layers)
        ]

    def __call__(
        self, x: Array, mask: Array | None = None, pool_rows: int | Array | None = None
    ) -> tuple[Array, Array, Array | None]:
        """Returns (output of the last block [B, L, D], its input, the last block's output at `pool_rows`
        [B, D] or None).

        Why the pooled rows are separate: a CLIP embedding reads one position of the last block (class
        token, EOT token). Computed on its own (`ResidualAttentionBlock.rows`), it does not depend on the
        full last-block output, so when nothing else reads that output (scene-only training) XLA drops it
        and the last block costs about a sixth; when dense features are read, the row is computed twice
        (one row of L).
        """
        for block in self.resblocks[:-1]:
            x = block(x, mask)
        last = self.resblocks[-1]
        pooled = None if pool_rows is None else last.rows(x, pool_rows, mask)
        return last(x, mask), x, pooled

    def segearth(self, penultimate: Array) -> Array:
        return self.resblocks[-1].segearth(penultimate)
