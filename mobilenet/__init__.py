"""Our own MobileNetV2: the network, BN folding, checkpoints and data."""
from .checkpoint import (CheckpointError, atomic_save, from_torchvision_state_dict, load_checkpoint, load_model,
                         to_torchvision_state_dict)
from .fold import fold_bn, fold_model, is_folded
from .model import ConvBNAct, InvertedResidual, MobileNetV2, ModelConfig, build_model, make_divisible

__all__ = ["MobileNetV2", "ModelConfig", "ConvBNAct", "InvertedResidual", "build_model", "make_divisible",
           "fold_bn", "fold_model", "is_folded", "CheckpointError", "atomic_save",
           "load_checkpoint", "load_model", "from_torchvision_state_dict",
           "to_torchvision_state_dict"]
