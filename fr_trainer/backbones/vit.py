"""Vision Transformers for 112x112 faces, in the layouts of arcface_torch's ViT recipes.

Layout (Dosovitskiy et al. 2021, adapted to faces as in insightface's arcface_torch):

- patch embedding: conv 9x9, stride 9 (3 -> W channels) on the 112x112 image: a 12x12
  grid of N = 144 tokens (the last 4 rows/columns of pixels fall outside the grid), plus
  a learned position embedding [1, N, W]; no class token;
- `depth` pre-norm blocks: x + DropPath(Attention(LayerNorm(x))), then
  x + DropPath(MLP(LayerNorm(x))); attention has `heads` heads, a bias-free qkv
  projection and a biased output projection; the MLP is W -> 4W -> W with ReLU6;
- a final LayerNorm, then the embedding head on the flattened tokens:
  Linear(N*W -> W, no bias) - BN1d(W) - Linear(W -> D, no bias) - BN1d(D) (eps 2e-5).

| name     | width W | depth | heads | drop-path | token masking | params (D 512) | GMACs |
|----------|--------:|------:|------:|----------:|--------------:|---------------:|------:|
| vit_t    |     256 |    12 |     8 |      0.05 |          0.0  |         19.14M |  1.50 |
| vit_s    |     512 |    12 |     8 |      0.05 |          0.0  |         76.02M |  5.75 |
| vit_b    |     512 |    24 |     8 |      0.05 |          0.05 |        113.83M | 11.44 |
| vit_l    |     768 |    24 |     8 |      0.05 |          0.05 |        255.68M | 25.34 |
| vit_h    |    1024 |    48 |     8 |      0.1  |          0.0  |        756.39M | 89.20 |
| vit_demo |     128 |     4 |     4 |      0.0  |          0.0  |   3.22M (D 128) | 0.14 |

The drop-path and masking defaults are those of the WebFace42M configs
(`vit_t_dp005_mask0`, `vit_s_dp005_mask_0`, `vit_b_dp005_mask_005`, `vit_l_dp005_mask_005`,
`vit_h`); arcface_torch's plain `vit_t`/`vit_s`/`vit_b` use drop-path 0.1 and masking 0.1
(`create_backbone("vit_t", drop_path_rate=0.1, mask_ratio=0.1)`). GMACs count the
convolution, the linear layers and the two attention products (q k^T, attn v), which is
what arcface_torch reports (its ptflops figure plus `extra_gflops`).

Token masking (training only): a random `mask_ratio` of the tokens of each image is
dropped before the blocks and replaced after the final LayerNorm by a learned
`mask_token`, so the head still sees N tokens. Stochastic depth: block i drops its
residual branches per sample with probability `drop_path_rate * i / (depth - 1)`.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`: the fused
flash / memory-efficient kernels on GPU (in the autocast dtype, fp16 or bf16), the math
kernel on CPU and in ONNX (MatMul-Softmax-MatMul). Gradient checkpointing recomputes each
block (`set_grad_checkpointing`). Parameter names follow arcface_torch's ViT
(`patch_embed.proj`, `pos_embed`, `mask_token`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm`, `feature.{0,1,2,3}`), so its checkpoints load as they are.

`forward_features` returns the tokens [B, N, W] (`feature_size` = the 12x12 grid,
`feature_channels` = W) and `forward_head` maps them to the embedding [B, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fr_trainer.backbones.base import FaceBackbone, check_head_args
from fr_trainer.backbones.registry import BACKBONES

IMAGE_SIZE = 112
PATCH_SIZE = 9
HEAD_BN_EPS = 2e-5


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `p`, scaling the
    kept ones by 1 / (1 - p) (identity in eval mode or when p is 0)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1); got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """images [B,3,112,112] -> tokens [B, N, W] through a conv with kernel = stride = patch."""

    def __init__(self, width: int, patch_size: int = PATCH_SIZE, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: qkv (no bias) -> scaled_dot_product_attention -> proj."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B,N,W] -> q, k, v, each [B, heads, N, W/heads]."""
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.split_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(W/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))

    def count_extra_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """MACs of q k^T and attn v (not modules, so not seen by the Linear/Conv hooks)."""
        b, n, w = inputs[0].shape
        return 2 * b * n * n * w


class Mlp(nn.Module):
    """W -> hidden -> W with ReLU6."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(FaceBackbone):
    """images [B,3,112,112] -> embeddings [B, embedding_size] (module docstring)."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        embedding_size: int = 512,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        patch_size: int = PATCH_SIZE,
    ) -> None:
        super().__init__()
        check_head_args(embedding_size, dropout)
        if depth < 1 or width < 1 or heads < 1:
            raise ValueError(f"depth, width and heads must be >= 1; got {depth}, {width}, {heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
        self.num_features = embedding_size
        self.feature_channels = width
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(width, patch_size)
        self.num_patches = self.patch_embed.num_patches
        self.feature_size = (self.patch_embed.grid, self.patch_embed.grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        # kept in the state_dict whatever mask_ratio (arcface_torch's checkpoints hold it), but
        # only trained when masking is on: unused parameters would stall DDP's reduction
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width), requires_grad=mask_ratio > 0)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linear rule
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, rate, qkv_bias) for rate in rates])
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(width * self.num_patches, width, bias=False),
            nn.BatchNorm1d(width, eps=HEAD_BN_EPS),
            nn.Linear(width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=HEAD_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear weights truncated-normal (std 0.02, cut at +-2), biases 0; LayerNorm 1/0;
        position embedding truncated-normal 0.02, mask token normal 0.02; the patch conv
        and BatchNorms keep PyTorch's defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B,3,112,112] -> tokens [B, N, W] after the final LayerNorm."""
        self._check_input(x)
        x = self.patch_embed(x) + self.pos_embed
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = self._drop_tokens(x)
        x = self._run_stages(x, list(self.blocks))
        x = self.norm(x)
        if restore is not None:
            x = self._restore_tokens(x, restore)
        return x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, W] -> embeddings [B, D]."""
        return self.feature(self.dropout(torch.flatten(tokens, 1)))

    # -- token masking (training only) --------------------------------------------------
    def _drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random int(N * (1 - mask_ratio)) tokens per image; returns them and the
        permutation that puts the kept tokens first."""
        b, n, w = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(b, keep, w))
        return kept, order

    def _restore_tokens(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Kept tokens back at their positions, `mask_token` at the dropped ones."""
        b, keep, w = x.shape
        n = order.shape[1]
        filled = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - keep, w)], dim=1)
        inverse = order.argsort(dim=1)
        return torch.gather(filled, 1, inverse[:, :, None].expand(b, n, w))


# name -> (width, depth, heads, drop_path_rate, mask_ratio)
LAYOUTS: dict[str, tuple[int, int, int, float, float]] = {
    "vit_t": (256, 12, 8, 0.05, 0.0),
    "vit_s": (512, 12, 8, 0.05, 0.0),
    "vit_b": (512, 24, 8, 0.05, 0.05),
    "vit_l": (768, 24, 8, 0.05, 0.05),
    "vit_h": (1024, 48, 8, 0.1, 0.0),
}


def _make(name: str):
    width, depth, heads, dpr, mask = LAYOUTS[name]

    def factory(embedding_size: int = 512, dropout: float = 0.0, drop_path_rate: float = dpr,
                mask_ratio: float = mask, depth: int = depth) -> VisionTransformer:
        return VisionTransformer(width, depth, heads, embedding_size, dropout, drop_path_rate, mask_ratio)

    factory.__name__ = name
    factory.__doc__ = (f"ViT for faces: width {width}, depth {depth}, {heads} heads, patch 9; "
                       f"drop-path {dpr}, token masking {mask} (arcface_torch's WebFace42M layout).")
    return BACKBONES.register(name)(factory)


vit_t = _make("vit_t")
vit_s = _make("vit_s")
vit_b = _make("vit_b")
vit_l = _make("vit_l")
vit_h = _make("vit_h")


@BACKBONES.register("vit_demo")
def vit_demo(embedding_size: int = 128, dropout: float = 0.0, drop_path_rate: float = 0.0,
             mask_ratio: float = 0.0, depth: int = 4) -> VisionTransformer:
    """A small ViT for CPU demos and tests: width 128, depth 4, 4 heads, patch 9."""
    return VisionTransformer(128, depth, 4, embedding_size, dropout, drop_path_rate, mask_ratio)
