"""Pruning MobileNetV2: sensitivity sweep, global L1 masks held through fine-tuning, structured channel pruning."""
from .config import PruneConfig, from_train_config, parse_ratio
from .masks import (MaskKeeper, apply_masks, check_zeros, global_l1_masks, prunable_layers, select_layers,
                    sparsity_report, state_dict_sizes)
from .structured import count_macs, count_params, measure_latency, structured_prune

__all__ = ["PruneConfig", "from_train_config", "parse_ratio", "MaskKeeper", "apply_masks", "check_zeros",
           "global_l1_masks", "prunable_layers", "select_layers", "sparsity_report", "state_dict_sizes",
           "structured_prune", "count_params", "count_macs", "measure_latency", "run_prune_pipeline"]


def run_prune_pipeline(*args, **kwargs):
    """See prune.pipeline.run_prune_pipeline (imported lazily: it pulls in data, engine and matplotlib)."""
    from .pipeline import run_prune_pipeline as run
    return run(*args, **kwargs)
