"""A straightforward PyTorch implementation of SegEarth-OV's protocol on an open_clip model, written from
SegEarth-OV's ``segearth_segmentor.py`` / ``open_clip/transformer.py`` description (not from our JAX code):
the reference that tests/test_eval_segmentation.py compares ``eval.segmentation`` against and that
tools/bench_segmentation.py times. Window by window, as SegEarth-OV runs it, in float32 on the CPU.

The SegEarth last layer: the last block's ``ln_1`` input through q-q + k-k + v-v self-attention and the
attention's output projection (no residual, no MLP), then ``ln_post`` and ``proj`` for every token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


class TorchSegEarth:
    def __init__(self, model_dir: str, classes: Sequence[Sequence[str]], templates: Sequence[str], *,
                 crop: int = 224, stride: int = 112, logit_scale: float = 50.0, cls_token_lambda: float = -0.3,
                 threshold: float = 0.0, background: int = 0, resize: tuple[int, int] | None = (448, 448)) -> None:
        import open_clip

        self.model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
        self.model.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
        names = [name for class_names in classes for name in class_names]
        self.query_class = torch.tensor([i for i, class_names in enumerate(classes) for _ in class_names])
        features = []
        with torch.no_grad():
            for name in names:
                embedding = self.model.encode_text(tokenizer([template.format(name) for template in templates]))
                embedding = embedding / embedding.norm(dim=-1, keepdim=True)
                mean = embedding.mean(dim=0)
                features.append(mean / mean.norm())
        self.queries = torch.stack(features)
        self.crop, self.stride, self.logit_scale = crop, stride, logit_scale
        self.cls_token_lambda, self.threshold, self.background, self.resize = (cls_token_lambda, threshold,
                                                                              background, resize)
        self.patch = self.model.visual.patch_size[0]

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        posemb = self.model.visual.positional_embedding
        old = int(round((posemb.shape[0] - 1) ** 0.5))
        if (grid_h, grid_w) == (old, old):
            return posemb
        grid = posemb[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        # SegEarth-OV's interpolate_pos_encoding: scale factors (g + 0.1) / old, bicubic, no antialiasing
        grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / old, (grid_w + 0.1) / old), mode="bicubic")
        return torch.cat([posemb[:1], grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])

    def _segearth_attention(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        y = block.ln_1(x)
        batch, length, width = y.shape
        heads = attn.num_heads
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = [t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v)]
        scale = (width // heads) ** -0.5
        weights = sum(torch.softmax(t @ t.transpose(-1, -2) * scale, dim=-1) for t in split)
        out = (weights @ split[2]).transpose(1, 2).reshape(batch, length, width)
        return attn.out_proj(out)

    def forward_feature(self, image: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] (multiples of the patch) -> logits [1, Q, H, W]."""
        visual = self.model.visual
        x = visual.conv1(image)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1)
        x = visual.ln_pre(x + self._position_embedding(grid_h, grid_w))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        tokens = visual.ln_post(self._segearth_attention(blocks[-1], x)) @ visual.proj
        cls_token, patches = tokens[:, 0], tokens[:, 1:]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
        logits = patches @ self.queries.T + self.cls_token_lambda * (cls_token @ self.queries.T)[:, None]
        logits = logits.transpose(1, 2).reshape(1, -1, grid_h, grid_w)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear")

    def forward_slide(self, image: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
        _, _, height, width = image.shape
        h_grids = max(height - self.crop + self.stride - 1, 0) // self.stride + 1
        w_grids = max(width - self.crop + self.stride - 1, 0) // self.stride + 1
        preds = image.new_zeros((1, len(self.queries), height, width))
        count = image.new_zeros((1, 1, height, width))
        self.windows = 0
        for h_index in range(h_grids):
            for w_index in range(w_grids):
                y1, x1 = h_index * self.stride, w_index * self.stride
                y2, x2 = min(y1 + self.crop, height), min(x1 + self.crop, width)
                y1, x1 = max(y2 - self.crop, 0), max(x2 - self.crop, 0)
                window = image[:, :, y1:y2, x1:x2]
                h, w = window.shape[2:]
                pad_w, pad_h = (-w) % self.patch, (-h) % self.patch
                left, top = pad_w // 2, pad_h // 2
                pad = (left, pad_w - left, top, pad_h - top)
                if any(pad):
                    window = F.pad(window, pad)
                logits = self.forward_feature(window)
                if any(pad):
                    logits = logits[:, :, top:top + h, left:left + w]
                preds += F.pad(logits, (x1, width - x2, y1, height - y2))
                count[:, :, y1:y2, x1:x2] += 1
                self.windows += 1
        return F.interpolate(preds / count, size=original, mode="bilinear")

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> labels [H, W]."""
        height, width = image.shape[:2]
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        if self.resize is not None:
            factor = min(max(self.resize) / max(height, width), min(self.resize) / min(height, width))
            size = (int(height * factor + 0.5), int(width * factor + 0.5))
            if size != (height, width):
                pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        pixels = (pixels / 255.0 - CLIP_MEAN) / CLIP_STD
        logits = self.forward_slide(pixels, (height, width))[0] * self.logit_scale
        probabilities = logits.softmax(0)
        num_classes = int(self.query_class.max()) + 1
        if num_classes != len(self.query_class):
            one_hot = F.one_hot(self.query_class).T.view(num_classes, len(self.query_class), 1, 1)
            probabilities = (probabilities[None] * one_hot).max(1)[0]
        labels = probabilities.argmax(0)
        labels[probabilities.max(0)[0] < self.threshold] = self.background
        return labels.numpy()
