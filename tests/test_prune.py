"""Pruning: masks hold through SGD, exact global ratios, a side-effect-free per-layer sweep, structured pruning equal
to its masked dense twin, zeros that survive folding, clear errors from the command line.

Fast: a width-0.25 model, random tensors where the data does not matter, and the synthetic `random` data source
(512 images) for the end-to-end command.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from conftest import ROOT
from mobilenet import atomic_save, fold_model, load_model
from mobilenet.data import Split
from mobilenet.engine import train_one_epoch
from prune.__main__ import main
from prune.config import PruneConfig, from_train_config
from prune.finetune import cubic_sparsity
from prune.masks import (MaskKeeper, apply_masks, check_zeros, global_l1_masks, prunable_layers, select_layers,
                         sparsity_report, state_dict_sizes)
from prune.structured import count_macs, count_params, structured_prune, zero_removed_channels
from prune.sweep import per_layer_sweep


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP hand-off costs that dominate (and explode on a busy
    2-core machine) for convolutions this small."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_bn(model):
    """Non-trivial BN statistics, so a channel whose conv weights are zero still emits a non-zero constant."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(m.num_features, generator=g))
    return model


def _random_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _save_tiny(path, model):
    atomic_save({"format": "mnv2-compress", "kind": "fp32", "model_config": model.cfg.to_dict(),
                 "model": model.state_dict()}, path)
    return str(path)


# ---------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("ratio", [0.3, 0.7, 0.9])
def test_global_ratio_reached_exactly(tiny_model, ratio):
    cfg = PruneConfig(ratio=ratio, min_density=0.0)
    layers = select_layers(tiny_model, cfg)
    masks = global_l1_masks(layers, ratio)
    apply_masks(tiny_model, masks)
    rep = sparsity_report(tiny_model, masks)
    total = sum(m.numel() for m in masks.values())
    # exact count: round(ratio * total) pruned, ties broken by position (none of the weights is zero at init)
    assert total - sum(int(m.sum()) for m in masks.values()) == round(ratio * total)
    assert abs(rep["global_sparsity"] - ratio) <= 1 / total
    assert "features.0.0.weight" not in masks            # stem conv excluded by default


def test_min_density_and_exclusions(tiny_model):
    cfg = PruneConfig(ratio=0.8, min_density=0.3, exclude_depthwise=True, exclude_classifier=True,
                      exclude_layers=["features.18.*"])
    layers = select_layers(tiny_model, cfg)
    assert not any(n.startswith("features.18") or n.startswith("classifier") for n in layers)
    assert all(m.groups == 1 for n, m in layers.items() if isinstance(m, nn.Conv2d))
    masks = global_l1_masks(layers, 0.8, min_density=0.3)
    for n, m in masks.items():
        assert m.float().mean().item() >= 0.3 - 1e-9, n       # every layer keeps >= 30%
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert pruned / total <= 0.7 + 1e-9                       # floors make 80% impossible: fewer pruned


def test_masks_hold_through_sgd_with_momentum_and_weight_decay(tiny_model):
    torch.manual_seed(0)
    model = tiny_model.train()
    masks = global_l1_masks(select_layers(model, PruneConfig(ratio=0.6)), 0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-2, nesterov=True)
    keeper = MaskKeeper(model, masks, opt)
    params = dict(model.named_parameters())
    split = _random_split(64)
    from mobilenet.data import BatchLoader

    def check():
        keeper.after_step()
        for n, m in masks.items():
            assert torch.count_nonzero(params[n][~m]) == 0, n
            buf = opt.state[params[n]].get("momentum_buffer")
            assert buf is None or torch.count_nonzero(buf[~m]) == 0, n

    for epoch in range(3):
        train_one_epoch(model, BatchLoader(split, 16, shuffle=True, augment=True, seed=epoch), opt,
                        after_step=check, disable_bar=True)
    # the gradient hook zeroed the masked gradient before the step (so momentum never saw it)
    for n, m in masks.items():
        assert params[n].grad is not None and torch.count_nonzero(params[n].grad[~m]) == 0
    keeper.remove()
    # control: without the keeper the same steps revive pruned weights (the test above is not vacuous)
    for _ in range(2):
        train_one_epoch(model, BatchLoader(split, 16), opt, disable_bar=True)
    assert any(torch.count_nonzero(params[n][~m]) > 0 for n, m in masks.items())


def test_cubic_schedule():
    assert cubic_sparsity(0, 100, 0.7) == 0.0
    assert cubic_sparsity(100, 100, 0.7) == pytest.approx(0.7)
    vals = [cubic_sparsity(t, 100, 0.7) for t in range(101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[50] == pytest.approx(0.7 * (1 - 0.5 ** 3))   # Zhu & Gupta: s_f + (s_i - s_f)(1 - t/T)^3


def test_zeros_survive_bn_folding_and_int8_rounding(tiny_model):
    model = _randomize_bn(tiny_model)
    masks = global_l1_masks(select_layers(model, PruneConfig(ratio=0.7)), 0.7)
    apply_masks(model, masks)
    folded = fold_model(model)                  # BN scales whole output channels: 0 * scale == 0 exactly
    sd = folded.state_dict()
    assert check_zeros(sd, masks) == []
    for n in masks:                             # symmetric per-channel int8 has zero-point 0: round(0 / s) == 0
        w = sd[n]
        scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
        q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127)
        assert torch.count_nonzero(q[~masks[n]]) == 0


def test_gzip_of_pruned_state_dict_is_smaller(tiny_model):
    dense = state_dict_sizes(tiny_model.state_dict())
    masks = global_l1_masks(select_layers(tiny_model, PruneConfig(ratio=0.7)), 0.7)
    apply_masks(tiny_model, masks)
    pruned = state_dict_sizes(tiny_model.state_dict())
    assert pruned["dense_bytes"] == dense["dense_bytes"]
    assert pruned["gzip_bytes"] < 0.7 * dense["gzip_bytes"]


# ---------------------------------------------------------------------------------------------- sweep

def test_per_layer_sweep_leaves_model_unchanged(tiny_model):
    model = _randomize_bn(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(sweep_ratios=[0.5, 0.9], sweep_bf16=False, channels_last=False, eval_batch_size=16)
    trials = []

    def after_trial(m, row):
        sd = m.state_dict()
        for k, v in before.items():
            assert torch.equal(sd[k], v), f"{k} changed after trial {row['layer']} @ {row['ratio']}"
        trials.append(row)

    rows = per_layer_sweep(model, _random_split(16), cfg, after_trial=after_trial, log=lambda *_: None)
    assert len(rows) == len(trials) == 1 + 2 * len(prunable_layers(model)) == 1 + 2 * 53
    for r in rows[1:]:   # each trial pruned exactly round(ratio * numel) weights of its layer
        assert r["reached_sparsity"] == pytest.approx(round(r["ratio"] * r["numel"]) / r["numel"])


# ---------------------------------------------------------------------------------------------- structured

def test_structured_equals_masked_dense(tiny_model, tmp_path):
    model = _randomize_bn(tiny_model)
    small, kept = structured_prune(model, 0.5)
    dense = zero_removed_channels(model, kept)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = small(x), dense(x)
    # Removing a channel drops terms that are exactly 0 * x from each sum; only the order in which the conv kernel
    # accumulates the remaining terms may change with the channel count: float32 reassociation, ~1e-7 relative.
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a, model(x), atol=1e-3)       # and the removal did change the model
    assert count_params(small) < count_params(model) and count_macs(small) < count_macs(model)
    assert small.cfg.hidden_channels[0] == 8              # block 0 (t = 1, no expand conv) is left as it is
    assert small.cfg.hidden_channels[1] == 24             # 48 hidden channels, half removed
    # the smaller model round-trips through a checkpoint: rebuilt from its config alone
    path = _save_tiny(tmp_path / "small.pt", small)
    again, _ = load_model(path)
    torch.testing.assert_close(again(x), a, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("args, needle", [
    (["--prune", "1.5"], "1.5"),
    (["--prune", "-0.1"], "-0.1"),
    (["--prune", "lots"], "lots"),
    (["--prune-structured", "auto"], "auto"),
    (["--prune", "0.5", "--exclude-layers", "nosuch.*"], "nosuch.*"),
    (["--sweep-only", "--sweep-layers", "features.99.*"], "features.99.*"),
    (["--prune", "0.5", "--min-density", "2"], "min_density"),
])
def test_cli_bad_inputs(tmp_path, tiny_model, capsys, args, needle):
    ckpt = _save_tiny(tmp_path / "tiny.pt", tiny_model)
    assert main(["--checkpoint", ckpt, "--out", str(tmp_path / "out"), "--data-source", "random"] + args) == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err
    assert not (tmp_path / "out" / "pruned.pt").exists()


def test_cli_subprocess_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prune", "--checkpoint", "x.pt", "--prune", "1.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "1.5" in r.stderr


def test_from_train_config_reads_train_fields():
    tcfg = types.SimpleNamespace(prune="0.6", prune_structured=None, seed=3, bf16=False, channels_last=False,
                                 batch_size=64, layout="cifar", prune_epochs=2, lr=0.3, eval_images=500)
    cfg = from_train_config(tcfg)
    assert (cfg.ratio, cfg.seed, cfg.bf16, cfg.batch_size, cfg.epochs, cfg.eval_images) == (0.6, 3, False, 64, 2, 500)
    assert cfg.lr == 0.001                           # train.py's own lr is not the fine-tuning lr
    with pytest.raises(ValueError, match="1.5"):
        from_train_config(types.SimpleNamespace(prune=1.5))


def test_cli_end_to_end(tmp_path, tiny_model):
    """Sweep (two layers) -> 70% gradual pruning -> one short fine-tune epoch -> checkpoint and report."""
    ckpt = _save_tiny(tmp_path / "tiny.pt", tiny_model)
    out = tmp_path / "out"
    rc = main(["--checkpoint", ckpt, "--out", str(out), "--data-source", "random", "--prune", "0.7", "--gradual",
               "--gradual-every", "1", "--sweep-layers", "features.1.*", "--sweep-ratios", "0.5,0.8",
               "--sweep-images", "64", "--sweep-global-images", "64", "--eval-images", "64",
               "--epochs", "1", "--images-per-epoch", "192", "--batch-size", "32", "--no-bf16"])
    assert rc == 0
    for f in ("pruned.pt", "prune_report.json", "prune_layers.csv", "prune_config.json", "sweep_global.csv",
              "sweep_global.png", "sweep_layers.csv", "sweep_layers.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "prune_report.json").read_text())
    assert abs(rep["global_sparsity"] - 0.7) < 0.005
    meta = json.loads((out / "prune_meta.json").read_text())   # provenance the report prints under each plot
    assert meta["checkpoint"] == ckpt and meta["command"].startswith("python ") and meta["machine"]["cores"]
    model, ck = load_model(out / "pruned.pt")
    assert ck["kind"] == "pruned" and ck["prune_config"]["ratio"] == 0.7 and ck["masks"]
    assert check_zeros(model.state_dict(), ck["masks"]) == []


def test_cli_structured_end_to_end(tmp_path, tiny_model):
    """50% structured + 50% unstructured on top, BN re-estimation, a few fine-tuning steps; the saved model is
    the smaller architecture and loads from its own config."""
    ckpt = _save_tiny(tmp_path / "tiny.pt", tiny_model)
    out = tmp_path / "out"
    rc = main(["--checkpoint", ckpt, "--out", str(out), "--data-source", "random", "--prune-structured", "0.5",
               "--prune", "0.5", "--no-sweep", "--eval-images", "64", "--epochs", "1", "--images-per-epoch", "64",
               "--batch-size", "32", "--bn-recalib-images", "64", "--latency-repeats", "4", "--no-bf16"])
    assert rc == 0
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["structured_after"]["params"] < rep["structured_before"]["params"]
    assert rep["structured_after"]["macs"] < rep["structured_before"]["macs"]
    assert {"latency_b1", "latency_b64"} <= set(rep["structured_after"])
    model, ck = load_model(out / "pruned.pt")
    assert model.cfg.hidden_channels == rep["hidden_channels"] and model.cfg.hidden_channels[1] == 24
    assert abs(rep["global_sparsity"] - 0.5) < 0.005 and check_zeros(model.state_dict(), ck["masks"]) == []
