"""Host memory of importing a Hugging Face checkpoint: peak RSS against the checkpoint's size on disk (goal <= 1.3x).

Writes a synthetic ~1.1B-parameter Llama checkpoint (TinyLlama's shape: vocab 32000, width 2048, 22 layers, 32 heads /
4 KV heads, SwiGLU 5632) in bfloat16, tensor by tensor, then, each in a fresh process:

- `import`: `axmini.interop.import_hf` streams it into parameters on one device (on CPU, device memory is host RSS);
- `import + export`: the same, then `export_hf` writes it back (checked bit-exact against the source);
- `baseline`: the process with jax and axmini imported and nothing loaded.

and reports each peak RSS (VmHWM), its ratio to the checkpoint size, and the same ratio with the baseline
subtracted (what the weights cost). Side by side: `naive`, a whole-file read (`f.read()`) then converted in one go,
which is what a converter without streaming does.

    python benchmarks/interop_benchmark.py [--layers 22] [--dir /tmp/axmini_synthetic_1b] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from axmini.interop.safetensors import TensorSpec, write_safetensors

SHAPE = dict(vocab=32000, dim=2048, heads=32, kv_heads=4, head_dim=64, hidden=5632)


def synthetic_config(layers: int) -> dict:
    s = SHAPE
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["dim"],
        "intermediate_size": s["hidden"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def synthetic_specs(layers: int) -> list[TensorSpec]:
    s, bf16 = SHAPE, np.dtype(ml_dtypes.bfloat16)
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    specs = [TensorSpec("model.embed_tokens.weight", (s["vocab"], s["dim"]), bf16)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (s["dim"],), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (q, s["dim"]), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, s["dim"]), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, s["dim"]), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (s["dim"], q), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (s["dim"],), bf16),
            TensorSpec(p + "mlp.gate_proj.weight", (s["hidden"], s["dim"]), bf16),
            TensorSpec(p + "mlp.up_proj.weight", (s["hidden"], s["dim"]), bf16),
            TensorSpec(p + "mlp.down_proj.weight", (s["dim"], s["hidden"]), bf16),
        ]
    specs.append(TensorSpec("model.norm.weight", (s["dim"],), bf16))
    specs.append(TensorSpec("lm_head.weight", (s["vocab"], s["dim"]), bf16))
    return specs


def write_checkpoint(directory: Path, layers: int) -> tuple[int, int]:
    """Writes the synthetic checkpoint (unless there); returns (parameters, bytes on disk)."""
    specs = synthetic_specs(layers)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.json"
    if not (config.exists() and json.loads(config.read_text()) == synthetic_config(layers)):
        rng = np.random.default_rng(0)
        shapes = {s.name: s for s in specs}

        def produce(name: str) -> np.ndarray:
            return (0.02 * rng.standard_normal(shapes[name].shape, np.float32)).astype(ml_dtypes.bfloat16)

        write_safetensors(directory, specs, produce)
        config.write_text(json.dumps(synthetic_config(layers)))
    return sum(math.prod(s.shape) for s in specs), (directory / "model.safetensors").stat().st_size


# Each measurement runs in a fresh process: peak RSS (ru_maxrss) only grows.
MEASURE = {
    "baseline": "",
    "import": "imported = import_hf(src)\nrss_loaded = rss()",
    "import + export": (
        "imported = import_hf(src)\n"
        "export_hf(imported.config, imported.params, out, like=imported.model)\n"
        "from axmini.interop.safetensors import TensorIndex\n"
        "a, b = TensorIndex.open(src), TensorIndex.open(out)\n"
        "assert all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.entries)"
    ),
    "naive": (
        "import json, struct\n"
        "data = open(src + '/model.safetensors', 'rb').read()\n"
        "n = struct.unpack('<Q', data[:8])[0]\n"
        "header = json.loads(data[8 : 8 + n])\n"
        "import ml_dtypes, numpy as np, jax\n"
        "arrays = {k: jax.device_put(np.frombuffer(data, ml_dtypes.bfloat16, int(np.prod(v['shape'])), 8 + n + "
        "v['data_offsets'][0]).reshape(v['shape'])) for k, v in header.items() if k != '__metadata__'}\n"
        "del data"
    ),
}
# Peak RSS is the kernel's high-water mark of this process's memory (VmHWM; ru_maxrss would include the parent's).
PROGRAM = """
import json, sys
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def peak_rss():
    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    return int(line.split()[1]) * 1024
import jax
jax.devices()
from axmini.interop import export_hf, import_hf
src, out = sys.argv[1], sys.argv[2]
rss_loaded = None
{body}
print(json.dumps({{"peak_rss": peak_rss(), "rss_loaded": rss_loaded}}))
"""


def measure(name: str, src: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        program = PROGRAM.format(body=MEASURE[name])
        result = subprocess.run(
            [sys.executable, "-c", program, str(src), f"{tmp}/out"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "axmini_synthetic_1b"))
    parser.add_argument("--out", default="benchmarks/results/interop.json")
    args = parser.parse_args()
    params, size = write_checkpoint(Path(args.dir), args.layers)
    print(f"synthetic Llama checkpoint: {params / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB bfloat16, {args.dir}")
    results = {name: measure(name, Path(args.dir)) for name in MEASURE}
    baseline = results["baseline"]["peak_rss"]
    rows = []
    print(f"{'run':<16} {'peak RSS':>10} {'/ size':>8} {'(peak - baseline) / size':>26}")
    for name, r in results.items():
        row = {
            "run": name,
            "peak_rss_bytes": r["peak_rss"],
            "peak_over_size": r["peak_rss"] / size,
            "above_baseline_over_size": (r["peak_rss"] - baseline) / size,
        }
        rows.append(row)
        print(
            f"{name:<16} {r['peak_rss'] / 2**30:>8.2f}Gi {row['peak_over_size']:>8.2f} "
            f"{row['above_baseline_over_size']:>26.2f}"
        )
    report = {
        "benchmark": "interop_import_memory",
        "command": "python benchmarks/interop_benchmark.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "checkpoint": {"parameters": params, "bytes": size, "dtype": "bfloat16", "layers": args.layers, **SHAPE},
        "goal": "import peak RSS <= 1.3 x checkpoint size",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
