"""The CLIP causal text tower (OpenAI layout): token + position embedding, causal blocks, EOT pooling."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from geoalign_jax.models.layers import Transformer, layer_norm, partitioned

Array = jax.Array


class TextTransformer(nn.Module):
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    embed_dim: int
    quick_gelu: bool
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.token_embedding = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        self.positional_embedding = self.param(
            "positional_embedding", partitioned(nn.initializers.normal(0.01), ("position", "embed")),
            (self.context_length, self.width), self.param_dtype,
        )
        self.transformer = Transformer(
            self.width, self.layers, self.heads, self.mlp_ratio, self.quick_gelu, self.remat,
            self.dtype, self.param_dtype, name="transformer",
        )
        self.ln_final = layer_norm("ln_final", self.dtype, self.param_dtype)
        self.text_projection = self.param(
            "text_projection", partitioned(nn.initializers.normal(self.width**-0.5), ("embed", "joint_embed")),
            (self.width, self.embed_dim), self.param_dtype,
        )

    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        """tokens [B, L] int32 -> (embedding [B, E] float32, token_states [B, L, D]).

        Causal mask only (no padding mask, as OpenAI/open_clip); pooled at argmax(tokens), which is
        the EOT token (49407, the largest id).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got {tokens.shape}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token length {length} exceeds the text tower's context length {self.context_length}"
            )
        eot = jnp.argmax(tokens, axis=-1)
        states, pooled = self._encode(tokens, eot)
        token_states = self.ln_final(states)
        buckets = length_buckets(length) if self.width >= MIN_BUCKETED_WIDTH else (length,)
        if len(buckets) > 1:
            # The embedding reads the EOT row only, and under the causal mask no row sees a later token,
            # so the first max(eot) + 1 tokens give the same embedding: the shortest bucket that holds
            # them is run (the full-length pass above then feeds only `token_states`, and XLA drops it
            # when nothing reads them). Differentiating a switch makes every branch return the residuals
            # of all branches (zeros for the others); with a caching allocator (see host_allocator.py) writing
            # those zeros costs less than rematerialising the taken branch (ViT-B/32 step, batch 32:
            # 4.33 vs 4.46 s with RS captions, 5.78 vs 6.40 s with 77-token ones).
            bucket = jnp.searchsorted(jnp.asarray(buckets), jnp.max(eot) + 1)
            branches = [functools.partial(_encode_prefix, prefix=prefix) for prefix in buckets]
            pooled = nn.switch(bucket, branches, self, tokens, eot)
        embedding = self.ln_final(pooled) @ self.text_projection.astype(self.dtype)
        return embedding.astype(jnp.float32), token_states

    def _encode(self, tokens: Array, eot: Array) -> tuple[Array, Array]:
        """tokens [B, L] -> (last-block states [B, L, D], last-block state at `eot` [B, D])."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        states, _, pooled = self.transformer(x, causal, pool_rows=eot)
        return states, pooled


# Text towers narrower than this run at full length: each bucket is another compiled copy of the tower,
# and for test/demo-sized towers (the "tiny" config, width 64) compiling it costs more than it saves.
MIN_BUCKETED_WIDTH = 256


def length_buckets(length: int, smallest: int = 32, growth: int = 4) -> tuple[int, ...]:
    """Token lengths the text tower runs at for `length` tokens: `smallest`, `smallest * growth`, ... below
    `length`, then `length` (77 -> 32, 77; 248 -> 32, 128, 248). A batch of 32 typical RS captions ends
    by token 32 (RSITMD: 97% of such batches). Each bucket is one more compiled copy of the text tower,
    hence few of them."""
    buckets = []
    prefix = smallest
    while prefix < length:
        buckets.append(prefix)
        prefix *= growth
    return (*buckets, length)


def _encode_prefix(module: TextTransformer, tokens: Array, eot: Array, *, prefix: int) -> Array:
    """The EOT rows' last-block state from the first `prefix` tokens (every EOT of the batch lies before)."""
    return module._encode(tokens[:, :prefix], eot)[1]
