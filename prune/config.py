"""Every pruning setting in one dataclass, with its meaning and units beside it.

`PruneConfig` is filled either by `python -m prune` (argparse built from the fields) or from train.py's
TrainConfig by `from_train_config`, which reads `tcfg.prune`, `tcfg.prune_structured`, the shared fields
(seed, bf16, channels_last, batch_size, layout) and any `tcfg.prune_<field>` train.py chooses to carry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from common.cli import EVAL_IMAGES_HELP
from mobilenet.precision import resolve_precision

__all__ = ["PruneConfig", "parse_ratio", "from_train_config", "DEFAULT_SWEEP_RATIOS"]

DEFAULT_SWEEP_RATIOS = (0.3, 0.5, 0.6, 0.7, 0.8)
EXACT_ACCURACY = "reported accuracies are compared with FP32 figures"


def parse_ratio(value, what: str = "--prune", allow_auto: bool = True):
    """None | "auto" | a fraction in [0, 1) given as float or str. Anything else is a ValueError naming it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        if not allow_auto:
            raise ValueError(f"{what} does not accept 'auto'; give a fraction in [0, 1)")
        return "auto"
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} should be a fraction in [0, 1){' or auto' if allow_auto else ''}, "
                         f"not {value!r}") from None
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{what} should be a fraction of weights to remove in [0, 1), not {value!r}")
    return r


@dataclass
class PruneConfig:
    # ---- what to prune
    ratio: float | str | None = field(default=None, metadata={"flags": ("--prune",),
        "help": "global unstructured sparsity in [0, 1) (fraction of conv/linear weights set to zero), or auto"})
    structured: float | None = field(default=None, metadata={"flags": ("--prune-structured",),
        "help": "fraction of expansion (hidden) channels removed from each inverted-residual block with t != 1"})
    exclude_first: bool = field(default=True, metadata={"help": "leave the stem conv (3 input channels) dense"})
    exclude_classifier: bool = field(default=False, metadata={"help": "leave the final linear layer dense"})
    exclude_depthwise: bool = field(default=False, metadata={"help": "leave every depthwise conv dense"})
    exclude_layers: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated fnmatch patterns of layer names kept dense, e.g. 'features.1.*'"})
    min_density: float = field(default=0.02, metadata={
        "help": "fraction of weights every pruned layer keeps at least, in [0, 1]"})
    structured_round: int = field(default=8, metadata={
        "help": "kept hidden channels per block are rounded to a multiple of this (SIMD width)"})
    # ---- sensitivity sweep
    sweep: bool = field(default=True, metadata={"help": "run the sensitivity sweep before pruning"})
    sweep_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_SWEEP_RATIOS), metadata={
        "help": "comma-separated sparsities tried by the sweep"})
    sweep_per_layer: bool = field(default=True, metadata={"help": "also prune each layer alone at each ratio"})
    sweep_layers: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated fnmatch patterns restricting the per-layer sweep (default: every layer)"})
    sweep_images: int = field(default=500, metadata={
        "help": "test images per per-layer sweep evaluation (evenly spaced, stratified); 0 = all"})
    sweep_minutes: float = field(default=1.5, metadata={
        "help": "wall-clock cap on the per-layer sweep in minutes (it runs ratio by ratio, so every layer is "
                "tried at the first ratios; the trials skipped are reported); 0 = none"})
    sweep_global_images: int = field(default=2000, metadata={
        "help": "test images per global sweep evaluation; 0 = all"})
    sweep_bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast for sweep evaluations (drops are relative to a baseline in the same precision); "
                "default: bf16 where the device runs it natively"})
    auto_threshold: float = field(default=2.0, metadata={
        "help": "--prune auto: largest swept global ratio whose accuracy drop is below this (points)"})
    # ---- fine-tuning
    epochs: int = field(default=5, metadata={"help": "fine-tuning epochs (0 = none)"})
    lr: float = field(default=0.001, metadata={"help": "SGD learning rate per batch (cosine to 0 over the run)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay (L2)"})
    images_per_epoch: int = field(default=0, metadata={
        "help": "cap on training images per fine-tuning epoch (a fresh random subset each epoch); 0 = all"})
    budget_minutes: float = field(default=4.0, metadata={
        "help": "wall-clock cap on fine-tuning in minutes (the cosine follows the time used); 0 = none"})
    gradual: bool = field(default=False, metadata={
        "help": "ramp sparsity up cubically during fine-tuning (Zhu & Gupta 2017) instead of one shot"})
    gradual_end: float = field(default=0.75, metadata={
        "help": "fraction of the fine-tuning steps by which the gradual ramp reaches the target"})
    gradual_every: int = field(default=20, metadata={"help": "steps between mask updates of the gradual ramp"})
    bn_recalib_images: int = field(default=2000, metadata={
        "help": "training images used to re-estimate BN statistics right after pruning (no weight change); 0 = skip"})
    label_smoothing: float = field(default=0.1, metadata={"help": "as in the reference training"})
    # ---- evaluation and run
    eval_images: int = field(default=0, metadata={
        "help": EVAL_IMAGES_HELP})
    eval_bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast for the before/after accuracies; default: FP32 (they are compared with FP32 figures)"})
    latency_repeats: int = field(default=20, metadata={"help": "timed forward passes per latency figure"})
    tolerance: float = field(default=0.5, metadata={
        "help": "points by which reached global sparsity may differ from the request before the run fails"})
    seed: int = field(default=0, metadata={"help": "shuffling and augmentation seed"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast while fine-tuning; default: bf16 where the device runs it natively"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format"})
    batch_size: int = field(default=128, metadata={"help": "fine-tuning batch size"})
    eval_batch_size: int = field(default=250, metadata={"help": "evaluation batch size"})
    layout: str = field(default="cifar", metadata={"help": "cifar or imagenet input layout"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> "PruneConfig":
        self.ratio = parse_ratio(self.ratio, "--prune")
        self.structured = parse_ratio(self.structured, "--prune-structured", allow_auto=False)
        if isinstance(self.sweep_ratios, str):
            self.sweep_ratios = [s for s in self.sweep_ratios.split(",") if s.strip()]
        self.sweep_ratios = [parse_ratio(r, "--sweep-ratios", allow_auto=False) for r in self.sweep_ratios]
        for name in ("exclude_layers", "sweep_layers"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [s.strip() for s in v.split(",") if s.strip()])
        if self.ratio == "auto" and not self.sweep_ratios:
            raise ValueError("--prune auto needs at least one sweep ratio")
        checks = [
            (0.0 <= self.min_density <= 1.0, "min_density", "in [0, 1]"),
            (self.structured_round >= 1, "structured_round", ">= 1"),
            (self.sweep_images >= 0, "sweep_images", ">= 0"),
            (self.sweep_global_images >= 0, "sweep_global_images", ">= 0"),
            (self.sweep_minutes >= 0, "sweep_minutes", ">= 0"),
            (self.auto_threshold > 0, "auto_threshold", "> 0 points"),
            (self.epochs >= 0, "epochs", ">= 0"),
            (self.lr > 0, "lr", "> 0"),
            (0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.images_per_epoch >= 0, "images_per_epoch", ">= 0"),
            (self.bn_recalib_images >= 0, "bn_recalib_images", ">= 0"),
            (self.budget_minutes >= 0, "budget_minutes", ">= 0"),
            (0.0 < self.gradual_end <= 1.0, "gradual_end", "in (0, 1]"),
            (self.gradual_every >= 1, "gradual_every", ">= 1"),
            (self.eval_images >= 0, "eval_images", ">= 0"),
            (self.latency_repeats >= 1, "latency_repeats", ">= 1"),
            (self.tolerance >= 0, "tolerance", ">= 0 points"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
            (self.layout in ("cifar", "imagenet"), "layout", "cifar or imagenet"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name} should be {want}, not {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve_precision(self, device) -> dict:
        """Replace each precision flag left at None by the hardware's choice (mobilenet/precision.py), once;
        returns {flag: {"dtype", "reason"}} for the report."""
        if getattr(self, "_precision", None) is None:
            self._precision = {}
            for name, exact in (("sweep_bf16", ""), ("bf16", ""), ("eval_bf16", EXACT_ACCURACY)):
                p = resolve_precision(getattr(self, name), device, exact=exact)
                setattr(self, name, p.bf16)
                self._precision[name] = p.to_dict()
        return self._precision


# train.py's fields that mean the same thing here; everything else is read as `tcfg.prune_<field>`.
_SHARED = ("seed", "bf16", "channels_last", "batch_size", "layout", "eval_images")


def from_train_config(tcfg, **overrides) -> PruneConfig:
    """A PruneConfig from train.py's TrainConfig: `prune`, `prune_structured`, the shared fields, and any
    optional `prune_<field>` (e.g. `prune_epochs`); fields train.py lacks keep their defaults here."""
    kw = {"ratio": getattr(tcfg, "prune", None), "structured": getattr(tcfg, "prune_structured", None)}
    for name in _SHARED:
        if hasattr(tcfg, name):
            kw[name] = getattr(tcfg, name)
    for f in fields(PruneConfig):
        if f.name not in kw and hasattr(tcfg, f"prune_{f.name}"):
            v = getattr(tcfg, f"prune_{f.name}")
            if v is not None:
                kw[f.name] = v
    if getattr(tcfg, "bf16", None) is not None:   # the user's --bf16/--no-bf16 forces the sweep too
        kw.setdefault("sweep_bf16", tcfg.bf16)
    kw.update(overrides)
    return PruneConfig(**kw)
