"""The one precision resolver (mobilenet/precision.py) and the step budgets of mobilenet/engine.py."""
from __future__ import annotations

import pytest
import torch

import train
from mobilenet import precision, training
from mobilenet.engine import DivergenceGuard, TrainingDiverged, budget_steps
from mobilenet.precision import resolve_precision
from common.machine import cpu_isa

# /proc/cpuinfo flag sets of the CPU kinds users run on (abridged to the flags that matter)
ZEN3_AVX2 = frozenset("fpu sse sse2 avx avx2 fma f16c".split())
ZEN4_VNNI_BF16 = frozenset("fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16".split())
SPR_AMX = frozenset("avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8".split())
ICELAKE = frozenset("avx2 avx512f avx512_vnni".split())
ARM_DOTPROD = frozenset("fp asimd asimddp".split())


@pytest.mark.parametrize("flags, isa, bf16", [
    (ZEN3_AVX2, "AVX2", False),
    (ZEN4_VNNI_BF16, "AVX-512 VNNI, bf16", True),
    (SPR_AMX, "AVX-512 VNNI, bf16, AMX", True),
    (ICELAKE, "AVX-512 VNNI", False),
    (ARM_DOTPROD, "NEON, dotprod", False),
])
def test_cpu_default_follows_native_bf16(flags, isa, bf16, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert cpu_isa(flags) == isa
    p = resolve_precision(None, "cpu")
    assert p.bf16 is bf16 and p.name == ("bf16" if bf16 else "fp32")
    assert isa in p.reason and ("emulated" in p.reason) is (not bf16)


def test_flags_force_either_way_and_exact_paths_stay_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: ZEN4_VNNI_BF16)
    assert resolve_precision(False, "cpu").to_dict() == {"dtype": "fp32", "reason": "forced by --no-bf16"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: ZEN3_AVX2)
    assert resolve_precision(True, "cpu").to_dict() == {"dtype": "bf16", "reason": "forced by --bf16"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: ZEN4_VNNI_BF16)
    assert resolve_precision(None, "cpu", exact="must match").to_dict() == {"dtype": "fp32", "reason": "must match"}
    assert resolve_precision(True, "cpu", exact="must match").bf16   # the user's flag still wins


def test_this_machine_is_resolved_from_its_own_flags():
    flags = precision.cpu_flags()
    want = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    assert resolve_precision(None, "cpu").bf16 is want


def test_budget_steps_golden():
    # 95 % of 60 s = 57 s, minus 3 probe steps of 0.5 s = 55.5 s: 111 steps over 2 epochs
    assert budget_steps(0.5, 128, 1.0, 2) == 55
    # plus 3,000 evaluated images at a third of 0.5 s per 128: 3.90625 s -> 51.59 s -> 103 steps -> 51 an epoch
    assert budget_steps(0.5, 128, 1.0, 2, eval_images=3000) == 51
    # a 10x slower machine gets a tenth of the steps, not a longer run: (57 - 15) / 5 = 8 -> 4 an epoch
    assert budget_steps(5.0, 128, 1.0, 2) == 4
    assert budget_steps(60.0, 128, 1.0, 2) == 1   # never zero


@pytest.mark.parametrize("warmup, total, steps", [(0.2, 3, 1), (0.2, 30, 15), (0.2, 200, 50), (0.2, 1000, 200),
                                                  (0.0, 1000, 0)])
def test_warmup_is_never_a_handful_of_steps(warmup, total, steps):
    cfg = train.TrainConfig(warmup=warmup, schedule="cosine" if warmup == 0 else "onecycle")
    assert training.warmup_steps(cfg, total) == steps
    # and never steeper than a 50-step ramp: a 30-step run (15 rising) peaks at 15/50 of --lr
    assert training.peak_scale(cfg, total) == (min(1.0, steps / 50) if steps else 1.0)


def test_divergence_guard():
    g = DivergenceGuard()
    for loss in (2.4, 2.3, 6.0, 2.2, 2.1):   # one bad batch: the 10-step average stays under 4.6
        g.check(loss, 10)
    with pytest.raises(TrainingDiverged, match="smoothed loss .* above 4.61 .*ln 10 = 2.30"):
        for loss in (6.0, 8.0, 9.4, 9.4, 9.4, 9.4, 9.4, 9.4, 9.4, 9.4):
            g.check(loss, 10)
    with pytest.raises(TrainingDiverged, match="the loss is nan"):
        DivergenceGuard().check(float("nan"), 10)
    g = DivergenceGuard()   # a pruned model's fine-tune may start above chance: 1.5x its first loss is allowed
    for loss in (6.9, 8.0, 9.0, 9.5, 7.0, 6.0):
        g.check(loss, 10)
    with pytest.raises(TrainingDiverged, match="above 10.35"):
        for _ in range(30):
            g.check(14.0, 10)


def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    torch.manual_seed(0)
    code = train.main(["--data-source", "random", "--width", "0.25", "--epochs", "1", "--max-steps-per-epoch", "30",
                       "--batch-size", "32", "--lr", "400", "--warmup", "0.01", "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]   # the rest is the progress bar
    assert code == 2 and len(err) == 1 and err[0].startswith("train.py: error: training diverged at step"), err
    assert not (out / "checkpoint.pt").exists()
