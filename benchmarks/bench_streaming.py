"""Peak memory and wall time of a search-only conversion, in memory vs layer-streaming (issue 16).

    python benchmarks/bench_streaming.py                        # Llama shape d=2048, h=8192 at 8 and 16 layers
    python benchmarks/bench_streaming.py --depths 4 --skip-memory   # a quick look: streaming only

The benchmark saves a random-weight Llama-family model with the shape of a ~1B model (d = 2048,
h = 8192, 16 heads, SmolLM2's tokenizer and its 49152-token vocabulary, tied embeddings; 1.17B
parameters at 16 layers) as sharded fp32 safetensors, once per depth, under --models (default: a
temporary folder). Each conversion is `moefy convert FOLDER --no-distill [--stream]` in a fresh
process, one thread; its peak resident memory is that process's ru_maxrss (os.wait4) and the wall
time is the whole command (start-up, reading, search, save). The baseline is the peak of a process
that imports everything a conversion imports and loads nothing. One block's weights are
(4d² + 3dh) × 4 bytes. Calibration is kept small so that it runs in minutes: 8 sequences of 256
tokens, 4096 sampled tokens per layer, 256 experts. A Markdown table goes to stdout and the records
to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moefy.bench import cpu_name

D_MODEL, D_FF, HEADS = 2048, 8192, 16
FLAGS = ["--no-distill", "--calibration-sequences", "8", "--sample-size", "4096", "--experts", "256"]
IMPORTS = "import moefy.api, moefy.streaming, moefy.cli.model_commands, transformers, accelerate, safetensors"
BLOCK_BYTES = (4 * D_MODEL * D_MODEL + 3 * D_MODEL * D_FF) * 4  # attention (q, k, v, o) + gate, up, down, fp32


def save_model(folder: Path, layers: int) -> None:
    """A random Llama model of `layers` blocks as fp32 shards of at most 1 GB, with SmolLM2's tokenizer."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from moefy.models import resolve_folder
smol = resolve_folder("smollm2-135m")
tok = AutoTokenizer.from_pretrained(smol)
config = LlamaConfig(hidden_size={D_MODEL}, intermediate_size={D_FF}, num_hidden_layers={layers}, num_attention_heads={HEADS},
                     num_key_value_heads={HEADS}, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
print(sum(p.numel() for p in model.parameters()) / 1e9, "B parameters")
model.save_pretrained({str(folder)!r}, max_shard_size="1GB")
tok.save_pretrained({str(folder)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def measure(cmd: list[str]) -> dict:
    """Wall time and peak resident memory (GB) of one fresh process running `cmd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {"seconds": round(seconds, 1), "peak_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}  # ru_maxrss: KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[8, 16])
    p.add_argument("--models", type=Path, help="where the random models are saved (default: a temporary folder)")
    p.add_argument("--skip-memory", action="store_true", help="streaming only (no in-memory conversion)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "streaming.json")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out this run does not measure again")
    args = p.parse_args()
    models = args.models or Path(tempfile.mkdtemp(prefix="moefy-streaming-"))
    baseline = measure([sys.executable, "-c", IMPORTS])["peak_gb"]
    rows = []
    for layers in args.depths:
        folder = models / f"llama-d{D_MODEL}-h{D_FF}-L{layers}"
        save_model(folder, layers)
        for mode in (["stream"] if args.skip_memory else ["memory", "stream"]):
            out = models / f"moe-L{layers}-{mode}"
            cmd = [sys.executable, "-m", "moefy.cli", "convert", str(folder), "--out", str(out), "--overwrite", *FLAGS]
            r = measure(cmd + (["--stream"] if mode == "stream" else []))
            above = r["peak_gb"] - baseline
            rows.append({"layers": layers, "mode": mode, **r, "above_baseline_gb": round(above, 3),
                         "blocks_of_weights": round(above * 1e9 / BLOCK_BYTES, 2)})
            print(rows[-1], flush=True)
    if args.merge and args.out.is_file():
        measured = {(r["layers"], r["mode"]) for r in rows}
        kept = [r for r in json.loads(args.out.read_text())["rows"] if (r["layers"], r["mode"]) not in measured]
        rows = sorted(kept + rows, key=lambda r: (r["layers"], r["mode"]))
    record = {"cpu": cpu_name(), "threads": 1, "d_model": D_MODEL, "d_ff": D_FF, "dtype": "float32",
              "block_weights_gb": round(BLOCK_BYTES / 1e9, 3), "baseline_gb": baseline, "flags": FLAGS,
              "command": "python benchmarks/bench_streaming.py " + " ".join(sys.argv[1:]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\n{record['cpu']}, 1 thread; one block's weights {record['block_weights_gb']} GB; baseline {baseline} GB\n")
    print("| layers | conversion | wall time | peak RSS | above baseline | in blocks of weights |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['mode']} | {r['seconds']:.0f} s | {r['peak_gb']:.2f} GB | {r['above_baseline_gb']:.2f} GB "
              f"| {r['blocks_of_weights']:.2f} |")


if __name__ == "__main__":
    main()
