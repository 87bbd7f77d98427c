"""MobileNetV2 (Sandler et al., 2018) built from its (t, c, n, s) table.

Two layouts share one set of weights:

    layout     input     stem stride   stage-2 stride
    imagenet   224x224   2             2
    cifar      32x32     1             1               (the two strides marked NOTE below)

Every convolution lives in a `ConvBNAct` block (conv, BatchNorm, ReLU6 or Identity), so BN folding,
pruning and quantization find one uniform unit. Parameter counts equal torchvision's `mobilenet_v2`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

__all__ = ["ModelConfig", "ConvBNAct", "InvertedResidual", "MobileNetV2", "build_model", "make_divisible",
           "INVERTED_RESIDUAL_SETTING", "LAYOUTS"]

# t: expansion factor, c: output channels, n: repeats, s: stride of the first repeat
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAYOUTS = ("cifar", "imagenet")
INPUT_SIZE = {"cifar": 32, "imagenet": 224}      # the layout's default input resolution
MIN_RESOLUTION = {"cifar": 32, "imagenet": 64}   # the last feature map keeps at least 2x2 (strides 8 and 32)


def check_resolution(layout: str, resolution: int | None) -> int:
    """The input resolution a model of `layout` runs at: `resolution`, or the layout's default when None. Any
    multiple of 8 from MIN_RESOLUTION up (MobileNetV2 ships at 96, 128, 160, 192 and 224); ValueError names the
    value otherwise."""
    if resolution is None:
        return INPUT_SIZE[layout]
    r = int(resolution)
    if r != resolution or r < MIN_RESOLUTION[layout] or r % 8:
        raise ValueError(f"--resolution should be a multiple of 8 from {MIN_RESOLUTION[layout]} up for the "
                         f"{layout} layout (e.g. {INPUT_SIZE[layout]}), not {resolution!r}")
    return r


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping below 90% of `v` (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass
class ModelConfig:
    layout: str = "cifar"            # "cifar" (32x32 by default) or "imagenet" (224x224 by default)
    width_mult: float = 1.0          # channel multiplier
    num_classes: int = 10
    dropout: float = 0.2             # before the classifier, as torchvision
    hidden_channels: list[int] | None = field(default=None)  # per-block expansion width; set by structured pruning
    resolution: int | None = None    # input height = width; None: the layout's default (INPUT_SIZE)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if not self.width_mult > 0:
            raise ValueError(f"width_mult should be > 0 instead of {self.width_mult}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes should be >= 1 instead of {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout should be in [0, 1) instead of {self.dropout}")
        if self.hidden_channels is not None:
            self.hidden_channels = [int(h) for h in self.hidden_channels]
        if self.resolution is not None:
            self.resolution = check_resolution(self.layout, self.resolution)

    @property
    def input_size(self) -> int:
        return check_resolution(self.layout, self.resolution)

    def to_dict(self) -> dict:
        return asdict(self)


def with_resolution(model: nn.Module, resolution: int | None) -> nn.Module:
    """`model` set to run at `resolution` (its config records it; the network itself is fully convolutional up
    to the global pool, so the weights fit any size); None leaves it at its own."""
    if resolution is not None:
        model.cfg = replace(model.cfg, resolution=check_resolution(model.cfg.layout, resolution))
    return model


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> ReLU6 (or Identity for the linear bottleneck). Children: 0 conv, 1 bn, 2 act."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act: bool = True):
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True) if act else nn.Identity(),
        )

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, hidden: int | None = None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        hidden = int(round(inp * expand_ratio)) if hidden is None else hidden
        if expand_ratio == 1 and hidden != inp:  # no pw layer: the dw conv sees the block's input channels
            raise ValueError(f"a block with expand_ratio 1 has hidden == inp == {inp}, not {hidden}")
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, kernel_size=1))                         # pw
        layers += [
            ConvBNAct(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),      # dw
            ConvBNAct(hidden, oup, kernel_size=1, act=False),                            # pw-linear
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None, **kwargs):
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig(**kwargs)
        self.cfg = cfg
        cifar = cfg.layout == "cifar"
        input_channel = make_divisible(32 * cfg.width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, cfg.width_mult))
        n_blocks = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING)
        if cfg.hidden_channels is not None and len(cfg.hidden_channels) != n_blocks:
            raise ValueError(f"hidden_channels has {len(cfg.hidden_channels)} entries, expected {n_blocks}")

        features: list[nn.Module] = [
            ConvBNAct(3, input_channel, stride=1 if cifar else 2)  # NOTE: stride 2 -> 1 for CIFAR-10
        ]
        block = 0
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            if cifar and stage == 1:
                s = 1  # NOTE: stride 2 -> 1 for CIFAR-10
            output_channel = make_divisible(c * cfg.width_mult)
            for i in range(n):
                hidden = None if cfg.hidden_channels is None else cfg.hidden_channels[block]
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t, hidden))
                input_channel = output_channel
                block += 1
        features.append(ConvBNAct(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)  # not x.mean((2, 3)): that leaves a TRANSPOSE in the LiteRT graph
        self.classifier = nn.Sequential(nn.Dropout(p=cfg.dropout), nn.Linear(self.last_channel, cfg.num_classes))
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, num_classes)
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def build_model(cfg: ModelConfig | dict | None = None, **kwargs) -> MobileNetV2:
    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    return MobileNetV2(cfg, **kwargs)
