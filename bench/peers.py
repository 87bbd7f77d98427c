"""The peer in the same run: ai-edge-quantizer (AEQ) makes its file for every matrix row it has a recipe for,
from our FP32 export and the same calibration images, and both files are measured by the same code.

    our row (config, per-channel, round to nearest)   AEQ recipe
    W8A8, static int8 activations, real calibration    static_wi8_ai8
    W8A16 static (int16 activations)                   static_wi8_ai16
    W8A8-dynamic (dynamic range)                       dynamic_wi8_afp32
    W8A32 weight-only                                  weight_only_wi8_afp32
    W4A32 weight-only                                  weight_only_wi4_afp32
    W4A8, static int8 activations, real calibration    static_wi4_ai8 (a configuration AEQ's README allows;
                                                       0.10.0 has no function of that name, so it is its
                                                       static_wi8_ai8 with num_bits 4 for the weights)
    W16A32 (fp16)                                      float casting of the weights to fp16

Measured for both files, each run by the LiteRT interpreter (XNNPACK, batch 1) on the matrix's evaluation
images: SNR and top-1 agreement of the logits against the FP32 model's, top-1, file bytes; host latency in
interleaved rounds (ours, AEQ, ours, ...), so drift on a shared machine hits both alike. The goal per pair: our
SNR at least AEQ's, and our file no larger. AEQ is an optional extra (`pip install -e .[peers]`); without it
the step says so and the matrix is unchanged. Results: out/peers.csv (one line per pair, written as each pair
finishes, so an interrupted run resumes) and the AEQ files in out/peers/.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import statistics
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.files import atomic_write_bytes, atomic_write_text
from mobilenet.data import BatchLoader, Split
from quantize.config import QuantConfig
from quantize.matrix import method_of
from quantize.metrics import compare_logits

__all__ = ["available", "peer_recipe", "aeq_recipe", "file_logits", "run_peers", "peer_blocks", "PEER_COLUMNS"]

PEER_COLUMNS = ["config", "aeq_recipe", "eval_images", "calib_images", "ours_file", "aeq_file",
                "ours_bytes", "aeq_bytes", "ours_snr_db", "aeq_snr_db", "ours_agreement", "aeq_agreement",
                "ours_top1", "aeq_top1", "ours_host_ms", "aeq_host_ms", "host_rounds", "snr_goal", "size_goal",
                "ours_weights", "aeq_weights"]
_FP16 = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
          "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT",
                        "explicit_dequantize": True}}]


def available() -> bool:
    return importlib.util.find_spec("ai_edge_quantizer") is not None


def peer_recipe(q: QuantConfig, method: str) -> str | None:
    """The AEQ recipe that makes the same kind of file as our row, or None (no such recipe, or a row of ours
    in a setting AEQ's recipes do not have: per-tensor weights, random calibration). AEQ rounds to nearest
    only, so a row of ours with AdaRound or bias correction meets the same AEQ file as our round-to-nearest row:
    what a user gets from each tool for that file kind."""
    if method == "fp32":
        return None
    if q.fp16_weights:
        return "fp16 float casting"
    if not q.per_channel or (q.act_mode == "static" and q.calib != "real"):
        return None
    return {(8, 8, "static"): "static_wi8_ai8", (8, 16, "dynamic"): "static_wi8_ai16",
            (8, 8, "dynamic"): "dynamic_wi8_afp32",
            (8, None, "none"): "weight_only_wi8_afp32", (4, None, "none"): "weight_only_wi4_afp32",
            (4, 8, "static"): "static_wi4_ai8"}.get((q.w_bits, q.a_bits, q.act_mode))


def aeq_recipe(name: str) -> list[dict]:
    """AEQ's recipe called `name`. static_wi4_ai8 is among the configurations AEQ's README allows (4-bit symmetric
    per-channel weights, 8-bit tensor-wise activations), but 0.10.0 has no function for it: it is static_wi8_ai8
    with 4-bit weights, everything else as AEQ sets it. AEQ's policy then leaves depthwise convs float."""
    from ai_edge_quantizer import recipe
    if name == "fp16 float casting":
        return copy.deepcopy(_FP16)
    if name == "static_wi4_ai8" and not hasattr(recipe, name):
        r = recipe.static_wi8_ai8()
        for entry in r:
            entry["op_config"]["weight_tensor_config"]["num_bits"] = 4
        return r
    return getattr(recipe, name)()


def _aeq_file(fp32: Path, name: str, calib: torch.Tensor) -> bytes:
    from ai_edge_quantizer import quantizer
    qt = quantizer.Quantizer(str(fp32), aeq_recipe(name))
    result = None
    if qt.need_calibration:
        from ai_edge_litert.interpreter import Interpreter
        sig = Interpreter(model_path=str(fp32)).get_signature_list()
        key, entry = next(iter(sig.items()))
        feeds = [{entry["inputs"][0]: calib[i:i + 1].numpy()} for i in range(len(calib))]
        result = qt.calibrate({key: feeds})
    return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


def file_logits(path: Path, split: Split, layout: str) -> torch.Tensor:
    """Float logits (N, K) of a .tflite over `split`, batch 1 with XNNPACK: float io as is, integer io through
    the file's own input and output scales. The one way both files of a pair are run."""
    from export.validate import interpreter
    it = interpreter(Path(path).read_bytes(), "xnnpack")
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], outp["quantization"]
    info = np.iinfo(inp["dtype"]) if inp["dtype"] != np.float32 else None
    res = []
    for x, _ in tqdm(BatchLoader(split, 1, layout), desc=Path(path).name, unit="img", leave=False, disable=None,
                     mininterval=1.0):
        a = x.numpy()
        if info is not None:
            a = np.clip(np.round(a / s_in) + z_in, info.min, info.max)
        it.set_tensor(inp["index"], a.astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(outp["index"]).astype(np.float64)
        res.append(torch.from_numpy((y - z_out) * s_out if outp["dtype"] != np.float32 else y))
    return torch.cat(res).float()


def weights_text(path) -> str:
    """How a file stores its conv / FC weights, e.g. "CONV_2D INT4 ×35, DEPTHWISE_CONV_2D FLOAT32 ×17": two files
    of one row may quantize different layers (AEQ's static_wi4_ai8 leaves the depthwise convs float)."""
    from export.flatbuffer import read, weight_storage
    counts = weight_storage(read(Path(path).read_bytes(), str(path)))
    return ", ".join(f"{op} {t} ×{n}" for (op, t), n in sorted(counts.items()))


def _done(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["config"]: r for r in csv.DictReader(f)}


def _write(path: Path, rows: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, PEER_COLUMNS)
    w.writeheader()
    w.writerows(rows.values())
    atomic_write_text(buf.getvalue(), path)


def run_peers(pairs: list[tuple[QuantConfig, str, str]], fp32_file: str, calib: torch.Tensor, split: Split,
              ref: torch.Tensor, layout: str, out: Path, host_runs: int = 50, rounds: int = 3) -> Path | None:
    """`pairs`: (config, our row's label, our file) for the rows with an AEQ recipe. Writes out/peers.csv."""
    from .host import HostConfig, run_host
    if not available():
        print("peers: ai-edge-quantizer is not installed (pip install -e .[peers]); no peer files made")
        return None
    csv_path, rows = out / "peers.csv", _done(out / "peers.csv")
    (out / "peers").mkdir(parents=True, exist_ok=True)
    # AEQ rounds to nearest, so one recipe makes one file whichever of our rows (rtn, AdaRound, bias-corrected)
    # it meets: made and measured once, also across a resumed run
    made = {r["aeq_recipe"]: Path(r["aeq_file"]) for r in rows.values() if Path(r["aeq_file"]).is_file()}
    aeq_metrics: dict[str, dict] = {}
    for q, label, ours in tqdm(pairs, desc="peers", unit="pair"):
        name = peer_recipe(q, method_of(q))
        if label in rows or name is None:
            continue
        aeq = made.setdefault(name, out / "peers" / (Path(ours).stem + "_aeq.tflite"))
        if not aeq.is_file():
            atomic_write_bytes(_aeq_file(Path(fp32_file), name, calib), aeq)
        if name not in aeq_metrics:
            aeq_metrics[name] = compare_logits(ref, file_logits(aeq, split, layout), split.labels)
        m = {"ours": compare_logits(ref, file_logits(ours, split, layout), split.labels), "aeq": aeq_metrics[name]}
        timed = [run_host(HostConfig(models=[ours, str(aeq)], threads=[1], xnnpack=[True], runs=host_runs))
                 for _ in range(rounds)]
        ms = {k: statistics.median(t[i]["median_ms"] for t in timed) for i, k in enumerate(("ours", "aeq"))}
        size = {"ours": Path(ours).stat().st_size, "aeq": aeq.stat().st_size}
        rows[label] = {"config": label, "aeq_recipe": name, "eval_images": len(split), "calib_images": len(calib),
                       "ours_file": ours, "aeq_file": str(aeq), "host_rounds": rounds,
                       **{f"{k}_{c}": v for k in ("ours", "aeq") for c, v in (
                           ("bytes", size[k]), ("snr_db", round(m[k]["snr_db"], 3)),
                           ("agreement", m[k]["agreement"]), ("top1", m[k]["acc_q"]), ("host_ms", round(ms[k], 4)))},
                       # at the precision reported (0.01 dB): the same weights give the same SNR up to float order
                       "snr_goal": "met" if round(m["ours"]["snr_db"], 2) >= round(m["aeq"]["snr_db"], 2) else "missed",
                       "size_goal": "met" if size["ours"] <= size["aeq"] else "missed",
                       "ours_weights": weights_text(ours), "aeq_weights": weights_text(aeq)}
        _write(csv_path, rows)
        r = rows[label]
        tqdm.write(f"peers: {label}: ours {r['ours_snr_db']:.1f} dB {size['ours']:,} B, AEQ ({name}) "
                   f"{r['aeq_snr_db']:.1f} dB {size['aeq']:,} B")
    return csv_path


def _goal(r: dict) -> str:
    """'met', or what misses: the SNR short of AEQ's, the bytes over."""
    missed = []
    if r["snr_goal"] != "met":
        missed.append(f"SNR {float(r['aeq_snr_db']) - float(r['ours_snr_db']):.2f} dB lower")
    if r["size_goal"] != "met":
        missed.append(f"file {int(r['ours_bytes']) - int(r['aeq_bytes']):,} B larger")
    return "met" if not missed else "missed: " + ", ".join(missed)


def peer_blocks(results: Path) -> list:
    """The report's section: each pair side by side, and whether our file meets the goal (blocks for
    bench.study_report); nothing when the matrix ran without --peers."""
    rows = list(_done(Path(results) / "peers.csv").values())
    if not rows:
        return []
    table = [[r["config"], r["aeq_recipe"], f"{float(r['ours_snr_db']):.1f} / {float(r['aeq_snr_db']):.1f} dB",
              f"{100 * float(r['ours_top1']):.2f} / {100 * float(r['aeq_top1']):.2f} %",
              f"{100 * float(r['ours_agreement']):.2f} / {100 * float(r['aeq_agreement']):.2f} %",
              f"{int(r['ours_bytes']):,} / {int(r['aeq_bytes']):,} B",
              f"{float(r['ours_host_ms']):.3f} / {float(r['aeq_host_ms']):.3f} ms",
              ("verdict", _goal(r))] for r in rows]
    return [("h2", "The peer in the same run: ai-edge-quantizer"),
            ("p", f"Each pair: our file / AEQ's, AEQ's made from our FP32 file with the same "
                  f"{rows[0]['calib_images']} calibration images; both run by the LiteRT interpreter (XNNPACK, "
                  f"batch 1) on the same {rows[0]['eval_images']} evaluation images, latency the median of "
                  f"{rows[0]['host_rounds']} interleaved rounds at 1 thread. Goal: our SNR at least AEQ's and "
                  f"our file no larger."),
            ("table", ["row", "AEQ recipe", "SNR vs FP32", "top-1", "agreement with FP32", "file", "host latency",
                       "goal"], table)] + _storage_blocks(rows)


def _storage_blocks(rows: list[dict]) -> list:
    """Where the two files of a pair store different layers in different types: said, since it explains a gap."""
    differ = [r for r in rows if r.get("ours_weights") and r.get("aeq_weights")
              and r["ours_weights"] != r["aeq_weights"]]
    if not differ:
        return []
    return [("p", "Weight storage differs between the two files of these pairs (conv / FC weights by stored type):"),
            ("ul", [f"{r['config']}: ours {r['ours_weights']}; AEQ's {r['aeq_weights']}" for r in differ])]
