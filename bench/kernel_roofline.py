"""Achieved TFLOP/s of the Triton loss kernels' passes against torch's matmul of the same shapes.

    python bench/kernel_roofline.py --batches 16384 65536 262144      # CUDA, bf16
    TRITON_INTERPRET=1 python bench/kernel_roofline.py --device cpu --rows 32 --batches 64 --dim 32

Each pass is as big as one or two (b x d) @ (d x B) products: the CLIP statistics pass is one
(the logits), each gradient pass two (recompute the logits, then dS @ T or dS.T @ I). The
ratio divides the pass's TFLOP/s by what torch.matmul reaches on the same product in the same
dtype, in the same process: 1.0 would be matmul speed with the softmax, the partial statistics
and the gradient tiles for free. Prints a table and writes JSON after every batch size, so a
timeout keeps what was measured. On CPU it runs under the Triton interpreter at toy sizes, a
check that the script works, not a measurement.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsclip_kernels.contrastive import INTERPRET, TritonOps  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seconds(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50) / 1e3
    fn()
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def passes(ops: TritonOps, image: torch.Tensor, texts: torch.Tensor) -> dict[str, tuple[int, Callable[[], object]]]:
    """Per pass: (matmul-sized products it does, a call running it)."""
    scale = torch.tensor([20.0], device=image.device)
    row_lse, col_max, col_sum = ops.clip_stats(image, texts, scale)
    col_lse, coef = col_max + col_sum.log(), torch.tensor(0.5, device=image.device)
    col_coef = torch.full((texts.shape[0],), 0.5, device=image.device)
    grads = (image, texts, scale, row_lse, col_lse, coef, col_coef, 0)
    return {"clip_stats": (1, lambda: ops.clip_stats(image, texts, scale)),
            "image_grads": (2, lambda: ops.clip_grads(*grads, need_texts=False)),
            "text_grads": (2, lambda: ops.clip_grads(*grads, need_image=False))}


def measure(batch: int, args: argparse.Namespace) -> list[dict]:
    rows = min(args.rows, batch)
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    image = F.normalize(torch.randn(rows, args.dim, generator=gen), dim=-1).to(args.device, dtype)
    texts = F.normalize(torch.randn(batch, args.dim, generator=gen), dim=-1).to(args.device, dtype)
    flops = 2 * rows * batch * args.dim
    matmul_s = seconds(lambda: image @ texts.T, args.device)
    results = [{"pass": "torch.matmul", "rows": rows, "batch": batch, "products": 1, "seconds": matmul_s,
                "tflops": flops / matmul_s / 1e12, "ratio_to_matmul": 1.0}]
    for name, (products, call) in passes(TritonOps(), image, texts).items():
        s = seconds(call, args.device)
        tflops = products * flops / s / 1e12
        results.append({"pass": name, "rows": rows, "batch": batch, "products": products, "seconds": s,
                        "tflops": tflops, "ratio_to_matmul": tflops / results[0]["tflops"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16384, 65536, 262144], help="texts B (gathered)")
    parser.add_argument("--rows", type=int, default=8192, help="image rows b on this rank (B/ranks in training)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default="bench/results/kernel_roofline_{device}_{dtype}.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available() or args.device == "cpu" and not INTERPRET:
        raise SystemExit("kernel_roofline: error: no CUDA device; on CPU run with TRITON_INTERPRET=1 and --device cpu")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (Triton interpreter)"
    import triton
    path = Path(args.json.format(device=args.device, dtype=args.dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "device": device_name,
              "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    print(f"{'pass':>13} {'b':>6} {'B':>7} {'ms':>9} {'TFLOP/s':>8} {'vs matmul':>9}   ({device_name}, {args.dtype}, d={args.dim})")
    for batch in args.batches:
        for row in measure(batch, args):
            record["rows"].append(row)
            print(f"{row['pass']:>13} {row['rows']:>6} {row['batch']:>7} {row['seconds'] * 1e3:>9.3f} "
                  f"{row['tflops']:>8.1f} {row['ratio_to_matmul']:>9.3f}", flush=True)
        path.write_text(json.dumps(record, indent=1))  # after every batch: a timeout keeps what ran
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
