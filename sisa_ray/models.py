"""The model zoo: ``mlp``, ``cnn`` (a small conv net), ``wide_cnn`` (a wider one with batch norm,
for backbones) and ``resnet18`` adapted to small images.

Input shape and class count come from the data. Flat feature vectors whose length is a perfect
square (digits' 64, MNIST's 784) are viewed as one-channel square images by the conv models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core.config import MODELS
from .core.training import seeded


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` for a conv model, or a ValueError saying why the input is not an image."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0]:
            return (1, side, side)
    raise ValueError(
        f"Conv models need image-shaped inputs (C,H,W), (H,W) or a square number of features. "
        f"Got input shape {input_shape}. Use --model mlp for tabular data."
    )


class MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations."""
        return self.net[:-1](x)


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer head; about 0.2M parameters on 28x28 inputs
    with hidden 128.

    ``wide``: 32 and 64 channels, each conv followed by batch norm (about 0.8M parameters with
    hidden 256): the backbone to pretrain on a public set, whose features a head can build on."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, n_classes: int,
                 wide: bool = False) -> None:
        super().__init__()
        self.shape = shape
        c = shape[0]
        c1, c2 = (32, 64) if wide else (16, 32)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if wide else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(c, c1), *block(c1, c2), nn.Flatten())
        with torch.no_grad():
            n_flat = self.body(torch.zeros(1, *shape)).shape[1]
        self.head = nn.Sequential(nn.Linear(n_flat, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(-1, *self.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class SmallResNet18(nn.Module):
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 8-32 pixel images."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.shape = shape
        net = resnet18(weights=None, num_classes=n_classes)
        net.conv1 = nn.Conv2d(shape[0], 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.out = net.fc
        net.fc = nn.Identity()
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, *self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def build_model(
    name: str, input_shape: tuple[int, ...], n_classes: int, *, hidden: int = 128,
    seed: int | None = None,
) -> nn.Module:
    """Build a model; with ``seed``, its initial weights are a pure function of the seed."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Known models: {list(MODELS)}.")

    def make() -> nn.Module:
        if name == "mlp":
            return MLP(math.prod(input_shape), hidden, n_classes)
        if name in ("cnn", "wide_cnn"):
            return SmallCNN(image_shape(input_shape), hidden, n_classes, wide=name == "wide_cnn")
        return SmallResNet18(image_shape(input_shape), n_classes)

    if seed is None:
        return make()
    with seeded(seed, torch.device("cpu")):
        return make()
