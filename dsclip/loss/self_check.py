"""A once-per-process check that the Triton loss kernels agree with their PyTorch twin on the
device at hand, before the first training step trusts them.

The kernels are tested under the Triton interpreter on CPU, but a GPU compiles them for real:
another Triton version, another architecture or a miscompiled tile config could give wrong
losses that train quietly. Comparing every primitive on a small problem costs a few
milliseconds after compilation and turns that into one clear error.
"""
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsclip.errors import LossKernelError
from dsclip_kernels.contrastive_twin import TwinOps

# tolerance by feature dtype: the kernels see the same rounded inputs as the fp32 twin
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
_checked: set[tuple[str, torch.dtype]] = set()


def _problem(device: torch.device, dtype: torch.dtype, dim: int) -> dict:
    """Ragged sizes (no multiple of a tile), the training's feature width, an offset, and a
    negative coefficient."""
    gen = torch.Generator().manual_seed(0)
    b, n_cols = 37, 83
    image = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).to(device, dtype)
    texts = F.normalize(torch.randn(n_cols, dim, generator=gen), dim=-1).to(device, dtype)
    scale = torch.tensor([20.0], device=device)
    logits = scale * image.float() @ texts.float().T
    return {"image": image, "texts": texts, "scale": scale, "bias": torch.tensor(-4.0, device=device),
            "offset": 29, "row_lse": logits.logsumexp(1), "col_lse": logits.logsumexp(0),
            "row_coef": torch.tensor(0.4, device=device),
            "col_coef": torch.linspace(-0.2, 0.8, n_cols, device=device)}


def _outputs(ops, p: dict) -> dict[str, torch.Tensor]:
    image, texts, scale, bias, offset = p["image"], p["texts"], p["scale"], p["bias"], p["offset"]
    row_lse, col_max, col_sum = ops.clip_stats(image, texts, scale)
    d_image, d_texts = ops.clip_grads(image, texts, scale, p["row_lse"], p["col_lse"], p["row_coef"],
                                      p["col_coef"], offset)
    s_image, s_texts, s_bias = ops.siglip_grads(image, texts, scale, bias, p["row_coef"], offset)
    return {"clip row lse": row_lse, "clip column lse": col_max + col_sum.log(),
            "clip image grad": d_image, "clip text grad": d_texts,
            "siglip loss": ops.siglip_row_loss(image, texts, scale, bias, offset),
            "siglip image grad": s_image, "siglip text grad": s_texts, "siglip bias grad": s_bias}


@torch.no_grad()
def check_against_twin(ops, device: torch.device, dtype: torch.dtype, dim: int = 64, force: bool = False) -> None:
    """Raise LossKernelError (on every rank) if `ops` disagrees with the twin on `device` in
    `dtype` at feature width `dim`; each (device type, dtype) is checked once per process
    unless `force`. Called by all ranks together where a process group exists."""
    device = torch.device(device)
    key = (device.type, dtype)
    if key in _checked and not force:
        return
    problem = _problem(device, dtype, dim)
    # the twin is the fp32 reference: no autocast or TF32 may make it the less accurate side
    with torch.autocast(device.type, enabled=False), _no_tf32():
        got, want = _outputs(ops, problem), _outputs(TwinOps(chunk_rows=16), problem)
    tol = TOLERANCE[dtype]
    errors = {name: (got[name].float() - expected).abs().max().item() / (1 + expected.abs().max().item())
              for name, expected in want.items()}
    worst = max(errors, key=errors.get)
    if not _all_ranks_pass(errors[worst] <= tol, device):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise LossKernelError(
            f"the Triton loss kernels disagree with the PyTorch twin on {where} in {dtype} ({worst}: error "
            f"{errors[worst]:.3g} relative to the largest value, tolerance {tol:g}, on this or another rank); "
            "train with loss.impl=torch_tiled and report this GPU and Triton version")
    _checked.add(key)


def _all_ranks_pass(passed: bool, device: torch.device) -> bool:
    """One failing rank fails them all: a lone raise would leave the others in their next collective."""
    if not dist.is_initialized():
        return passed
    flag = torch.tensor([0 if passed else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


@contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
