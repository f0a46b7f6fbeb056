"""The two-tower CLIP model, its configuration, and pure `encode_image` / `encode_text` functions.

Parameters are a plain nested dict (no Flax boxing):
```
visual/  conv1/kernel [P, P, 3, Dv]          class_embedding [Dv]      positional_embedding [1+g*g, Dv]
         ln_pre/{scale,bias}   transformer/resblocks_{i}/...   ln_post/{scale,bias}   proj [Dv, E]
text/    token_embedding/embedding [V, Dt]   positional_embedding [L, Dt]
         transformer/resblocks_{i}/...       ln_final/{scale,bias}   text_projection [Dt, E]
logit_scale []  (log space)                  logit_bias []  (only when `init_logit_bias` is set, SigLIP)
block:   ln_1, attn/{query,key,value}/{kernel [D, H, D/H], bias [H, D/H]}, attn/out/{kernel [H, D/H, D],
         bias [D]}, ln_2, mlp/c_fc/{kernel [D, 4D], bias}, mlp/c_proj/{kernel [4D, D], bias}
```
`param_logical_axes(config)` gives the logical axis names of every leaf.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from geoalign_jax.models.layers import partitioned
from geoalign_jax.models.text import TextTransformer
from geoalign_jax.models.vision import DenseFeatures, VisionTransformer

Array = jax.Array
Params = dict[str, Any]

# ln(1 / 0.07): CLIP's initial temperature.
INIT_LOGIT_SCALE = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture plus numerics. Hashable, so it can be a static argument of `jax.jit`.

    embed_dim: joint embedding size E.  quick_gelu: OpenAI's x*sigmoid(1.702x) instead of erf GELU
    (OpenAI-initialised checkpoints need it).  dtype: compute dtype (e.g. "bfloat16"); param_dtype: the
    stored parameters' dtype.  remat: rematerialise each block in the backward pass.
    init_logit_bias: adds a learnable SigLIP bias initialised to this value (None = no bias).
    """

    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    quick_gelu: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    init_logit_bias: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPConfig":
        """Builds a config from `to_dict` output; unknown fields are refused by name."""
        data = dict(data)
        sub = {"vision": VisionConfig, "text": TextConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown model config field {key!r} (known: {sorted(known)})")
            if key in sub:
                sub_known = {f.name for f in dataclasses.fields(sub[key])}
                bad = sorted(set(value) - sub_known)
                if bad:
                    raise ValueError(f"unknown model config field {key}.{bad[0]!r} (known: {sorted(sub_known)})")
                value = sub[key](**value)
            kwargs[key] = value
        return cls(**kwargs)


_NAMED_CONFIGS: dict[str, CLIPConfig] = {
    "ViT-B-32": CLIPConfig(),
    "ViT-B-16": CLIPConfig(vision=VisionConfig(patch_size=16)),
    "ViT-L-14": CLIPConfig(
        embed_dim=768,
        vision=VisionConfig(patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, heads=12, layers=12),
    ),
    # Test/demo size: a few hundred thousand parameters, compiles in seconds on a CPU.
    "tiny": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
}


def model_names() -> list[str]:
    """Names accepted by `get_model_config` ("-quickgelu" may be appended to any of them)."""
    return sorted(_NAMED_CONFIGS)


def override_types() -> dict[str, type]:
    """Every field `get_model_config` overrides, by its override name (`embed_dim`, `vision_width`,
    `text_context_length`, ...) -> its type; `remat` is left out (the trainer sets it from `train.remat`)."""
    types = {}
    for prefix, cls in (("", CLIPConfig), ("vision_", VisionConfig), ("text_", TextConfig)):
        for field in dataclasses.fields(cls):
            if field.name in ("vision", "text", "remat") and cls is CLIPConfig:
                continue
            default = field.default
            types[prefix + field.name] = float if field.name == "init_logit_bias" else type(default)
    return types


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """A named architecture, e.g. "ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14", "tiny".

    Overrides are top-level fields (`dtype="bfloat16"`) or sub-config fields with a `vision_` /
    `text_` prefix (`vision_image_size=64`, `text_context_length=248`).
    """
    quick = name.endswith("-quickgelu")
    base_name = name[: -len("-quickgelu")] if quick else name
    if base_name not in _NAMED_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {model_names()} (optionally with '-quickgelu')")
    config = _NAMED_CONFIGS[base_name]
    if quick:
        config = dataclasses.replace(config, quick_gelu=True)
    top, vision, text = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key.startswith("text_"):
            text[key[len("text_"):]] = value
        else:
            top[key] = value
    data = config.to_dict()
    data.update(top)
    data["vision"] = {**data["vision"], **vision}
    data["text"] = {**data["text"], **text}
    return CLIPConfig.from_dict(data)


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.visual = VisionTransformer(
            cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers,
            cfg.vision.heads, cfg.vision.mlp_ratio, cfg.embed_dim, cfg.quick_gelu, cfg.remat, dtype,
            param_dtype, name="visual",
        )
        self.text = TextTransformer(
            cfg.text.context_length, cfg.text.vocab_size, cfg.text.width, cfg.text.layers, cfg.text.heads,
            cfg.text.mlp_ratio, cfg.embed_dim, cfg.quick_gelu, cfg.remat, dtype, param_dtype, name="text",
        )
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(INIT_LOGIT_SCALE), ()), (), param_dtype
        )
        if cfg.init_logit_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(cfg.init_logit_bias), ()), (), param_dtype
            )

    def encode_image(self, image: Array, dense: DenseFeatures = "last") -> tuple[Array, Array]:
        return self.visual(image, dense)

    def encode_image_dense(self, image: Array, dense: DenseFeatures = "segearth",
                           posemb_resize: str = "open_clip") -> tuple[Array, Array]:
        return self.visual.dense_tokens(image, dense, posemb_resize)

    def encode_text(self, tokens: Array) -> tuple[Array, Array]:
        return self.text(tokens)

    def __call__(self, image: Array, tokens: Array) -> tuple[Array, Array, Array]:
        image_embedding, _ = self.visual(image)
        text_embedding, _ = self.text(tokens)
        return image_embedding, text_embedding, self.logit_scale


def _dummy_inputs(config: CLIPConfig) -> tuple[Array, Array]:
    size = config.vision.image_size
    return (
        jnp.zeros((1, size, size, 3), jnp.float32),
        jnp.zeros((1, config.text.context_length), jnp.int32),
    )


def init_params(config: CLIPConfig, rng: Array) -> Params:
    """Randomly initialised parameters as a plain nested dict (logical names stripped)."""
    variables = jax.jit(CLIP(config).init)(rng, *_dummy_inputs(config))
    return nn.unbox(variables["params"])


def param_logical_axes(config: CLIPConfig) -> Params:
    """The logical axis names (a PartitionSpec of names) of every parameter, without allocating."""
    abstract = jax.eval_shape(CLIP(config).init, jax.random.key(0), *_dummy_inputs(config))
    return nn.get_partition_spec(abstract)["params"]


def encode_image(
    config: CLIPConfig, params: Params, image: Array, *, dense: DenseFeatures = "last"
) -> tuple[Array, Array]:
    """image [..., H, W, 3] normalised -> (embedding [..., E], patch_tokens [..., gh, gw, E]).

    Embeddings are unnormalised (the loss normalises). Leading axes beyond one are flattened for the
    tower and restored, so region crops [B, R, h, w, 3] can be passed as they are.
    """
    lead = image.shape[:-3]
    flat = image.reshape((-1,) + image.shape[-3:])
    embedding, patches = CLIP(config).apply({"params": params}, flat, dense, method=CLIP.encode_image)
    return embedding.reshape(lead + embedding.shape[1:]), patches.reshape(lead + patches.shape[1:])


def encode_image_dense(
    config: CLIPConfig, params: Params, image: Array, *, dense: DenseFeatures = "segearth",
    posemb_resize: str = "open_clip",
) -> tuple[Array, Array]:
    """image [B, H, W, 3] normalised -> (class row [B, E], patch tokens [B, gh, gw, E]) of the dense output
    (`VisionTransformer.dense_tokens`): what open-vocabulary segmentation scores. Unnormalised.
    posemb_resize: "open_clip" or "segearth" (SegEarth-OV's position-embedding interpolation for windows)."""
    return CLIP(config).apply({"params": params}, image, dense, posemb_resize, method=CLIP.encode_image_dense)


def encode_text(config: CLIPConfig, params: Params, tokens: Array) -> tuple[Array, Array]:
    """tokens [..., L] int32 -> (embedding [..., E], token_states [..., L, D]), pooled at EOT."""
    lead = tokens.shape[:-1]
    flat = tokens.reshape(-1, tokens.shape[-1])
    embedding, states = CLIP(config).apply({"params": params}, flat, method=CLIP.encode_text)
    return embedding.reshape(lead + embedding.shape[1:]), states.reshape(lead + states.shape[1:])
