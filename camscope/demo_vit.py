"""The demo's vision transformer: a hybrid ViT (convolutional features -> transformer tokens), as in
Dosovitskiy et al.'s ViT-hybrid, sized for the two-view digits.

Each view has a small convolutional branch (64x64 -> 16x16); the two views' features are joined and
brought to an 8x8 map, whose 64 positions become tokens; a class token is prepended and two pre-norm
encoder blocks (torchvision's ``EncoderBlock``) mix them. Every token layer is ``[B, 65, C]``:
camscope drops the class token and reads the other 64 as an 8x8 grid by itself (from the token count
and the input's aspect ratio: there is no patch convolution), so the transformer gets a depth strip
like the CNNs'. A plain 8x8-patch ViT learned little here (0.16-0.24 validation accuracy after 8-10
epochs, with and without a conv stem per view): transformers need more data or a convolutional start.
"""

from __future__ import annotations

import torch
from torch import nn

GRID = 8


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """conv (stride 2) -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class TwoViewViT(nn.Module):
    """``forward(left, right) -> logits [B, classes]``.

    Args:
        width: channels of each view's first conv (the second has twice as many).
        fused: token dimension (channels of the joined 8x8 map); the blocks' MLPs are twice as wide.
        classes: number of output logits.
    """

    def __init__(self, width: int = 16, fused: int = 64, classes: int = 10, depth: int = 2, heads: int = 4) -> None:
        # imported here: torchvision costs every process that imports the demo about a second
        from torchvision.models.vision_transformer import EncoderBlock

        super().__init__()
        self.left_branch = nn.Sequential(_conv(1, width, 5), _conv(width, 2 * width, 3))
        self.right_branch = nn.Sequential(_conv(1, width, 5), _conv(width, 2 * width, 3))
        self.fusion = _conv(4 * width, fused, 3)
        self.class_token = nn.Parameter(torch.zeros(1, 1, fused))
        self.position = nn.Parameter(torch.randn(1, 1 + GRID * GRID, fused) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(heads, fused, 2 * fused, 0.0, 0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(fused)
        self.classifier = nn.Linear(2 * fused, classes)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        features = self.fusion(torch.cat([self.left_branch(left), self.right_branch(right)], dim=1))
        tokens = features.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.position
        tokens = self.norm(self.blocks(tokens))
        # the class token and the max over positions: the max keeps the last block's positions in play
        # and, as in the CNNs, finds one small digit among clutter
        return self.classifier(torch.cat([tokens[:, 0], tokens[:, 1:].amax(dim=1)], dim=1))
