"""The CLIP ViT image tower (OpenAI layout): conv patches, class token, ln_pre, blocks, ln_post, proj."""
from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from geoalign_jax.models.layers import Transformer, layer_norm, partitioned
from geoalign_jax.models.posemb import POSEMB_RESIZES, resize_image_posemb, resize_image_posemb_segearth

Array = jax.Array
DenseFeatures = Literal["last", "segearth"]


class PatchEmbedding(nn.Module):
    """OpenAI's bias-free `conv1` over non-overlapping P x P patches, as one matmul over the flattened
    patches (same parameter `kernel` [P, P, 3, D], same initial values as `nn.Conv`): XLA's CPU convolution
    took twice as long for the forward pass and kernel gradient (ViT-B/32, batch 32: 114 vs 59 ms)."""

    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image: Array) -> Array:
        """image [B, H, W, C] (H, W multiples of P) -> [B, H / P, W / P, D]."""
        p = self.patch_size
        batch, height, width, channels = image.shape
        kernel = self.param(
            "kernel", partitioned(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
            (p, p, channels, self.width), self.param_dtype,
        )
        patches = image.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, height // p, width // p, p * p * channels).astype(self.dtype)
        return patches @ kernel.reshape(p * p * channels, self.width).astype(self.dtype)


class VisionTransformer(nn.Module):
    image_size: int
    patch_size: int
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
        scale = self.width**-0.5
        grid = self.image_size // self.patch_size
        self.conv1 = PatchEmbedding(self.patch_size, self.width, self.dtype, self.param_dtype)
        self.class_embedding = self.param(
            "class_embedding", partitioned(nn.initializers.normal(scale), ("embed",)), (self.width,),
            self.param_dtype,
        )
        self.positional_embedding = self.param(
            "positional_embedding", partitioned(nn.initializers.normal(scale), ("position", "embed")),
            (grid * grid + 1, self.width), self.param_dtype,
        )
        self.ln_pre = layer_norm("ln_pre", self.dtype, self.param_dtype)
        self.transformer = Transformer(
            self.width, self.layers, self.heads, self.mlp_ratio, self.quick_gelu, self.remat,
            self.dtype, self.param_dtype, name="transformer",
        )
        self.ln_post = layer_norm("ln_post", self.dtype, self.param_dtype)
        self.proj = self.param(
            "proj", partitioned(nn.initializers.normal(scale), ("embed", "joint_embed")),
            (self.width, self.embed_dim), self.param_dtype,
        )

    def _project(self, tokens: Array) -> Array:
        return jnp.einsum("...d,de->...e", self.ln_post(tokens), self.proj.astype(self.dtype))

    def __call__(self, image: Array, dense: DenseFeatures = "last") -> tuple[Array, Array]:
        """image [B, H, W, 3] normalised -> (embedding [B, E], patch_tokens [B, gh, gw, E]), float32.

        H, W other than `image_size` interpolate the position embedding (open_clip's resize).
        """
        x, penultimate, pooled, (batch, gh, gw) = self._trunk(image)
        embedding = self._project(pooled)
        if dense == "segearth":
            patch_tokens = self._project(self.transformer.segearth(penultimate)[:, 1:])
        elif dense == "last":
            patch_tokens = self._project(x[:, 1:])
        else:
            raise ValueError(f"dense features must be 'last' or 'segearth', got {dense!r}")
        patch_tokens = patch_tokens.reshape(batch, gh, gw, -1)
        return embedding.astype(jnp.float32), patch_tokens.astype(jnp.float32)

    def dense_tokens(self, image: Array, dense: DenseFeatures = "segearth",
                     posemb_resize: str = "open_clip") -> tuple[Array, Array]:
        """image [B, H, W, 3] -> (class row [B, E], patch tokens [B, gh, gw, E]) of one dense output,
        both after ln_post and proj, float32.

        Why the class row of the dense output and not the embedding: SegEarth-OV's CLS-token term scores
        the class token of the same modified last layer as the patches (for "last" both are the same).
        posemb_resize: how another input size resizes the position embedding, "open_clip" (the tower's) or
        "segearth" (SegEarth-OV's sliding windows: `posemb.resize_image_posemb_segearth`).
        """
        x, penultimate, _, (batch, gh, gw) = self._trunk(image, posemb_resize)
        if dense == "segearth":
            tokens = self._project(self.transformer.segearth(penultimate))
        elif dense == "last":
            tokens = self._project(x)
        else:
            raise ValueError(f"dense features must be 'last' or 'segearth', got {dense!r}")
        return tokens[:, 0].astype(jnp.float32), tokens[:, 1:].reshape(batch, gh, gw, -1).astype(jnp.float32)

    def _trunk(self, image: Array, posemb_resize: str = "open_clip"
               ) -> tuple[Array, Array, Array, tuple[int, int, int]]:
        """Patches, class token, position embedding, ln_pre and the blocks: (last block output, its input,
        the class row of the last block, (B, gh, gw))."""
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be [B, H, W, 3], got {image.shape}")
        if image.shape[1] % self.patch_size or image.shape[2] % self.patch_size:
            raise ValueError(f"image size {image.shape[1:3]} is not a multiple of patch size {self.patch_size}")
        x = self.conv1(image.astype(self.dtype))
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1)
        if posemb_resize not in POSEMB_RESIZES:
            raise ValueError(f"posemb_resize must be one of {POSEMB_RESIZES}, got {posemb_resize!r}")
        resize = resize_image_posemb_segearth if posemb_resize == "segearth" else resize_image_posemb
        x = x + resize(self.positional_embedding, (gh, gw)).astype(self.dtype)
        x = self.ln_pre(x)
        x, penultimate, pooled = self.transformer(x, pool_rows=0)  # the class token
        return x, penultimate, pooled, (batch, gh, gw)
