"""The CLIP causal text tower (OpenAI layout): token + position embedding, causal blocks, EOT pooling."""
from __future__ import annotations

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
        x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        eot = jnp.argmax(tokens, axis=-1)
        x, _, pooled = self.transformer(x, causal, pool_rows=eot)
        token_states = self.ln_final(x)
        embedding = self.ln_final(pooled) @ self.text_projection.astype(self.dtype)
        return embedding.astype(jnp.float32), token_states
