"""Parity of the Triton contrastive kernels with their PyTorch twin, primitive by primitive.

On CPU the kernels run in the Triton interpreter (tests/conftest.py), so shapes stay tiny;
`-m gpu` runs the same table plus larger shapes on CUDA for real.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.contrastive import TritonOps
from kernels.contrastive_twin import TwinOps

# dtype -> tolerances of the kernels against the fp32 twin fed the same (rounded) inputs
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}
CPU_SHAPES = [(1, 1, 32), (1, 40, 32), (19, 40, 45), (40, 40, 64)]  # (b, B, d): ragged vs 32-wide tiles
GPU_SHAPES = [(1, 3, 32), (257, 514, 77), (1000, 2000, 512), (333, 999, 1024)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

gpu = pytest.mark.gpu


def _case(b: int, n_cols: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(DEVICE, dtype)
    texts = F.normalize(torch.randn(n_cols, d, generator=gen), dim=-1).to(DEVICE, dtype)
    scale = torch.tensor([14.3], device=DEVICE)
    bias = torch.tensor(-3.1, device=DEVICE)
    offset = (n_cols - b) // 2
    # column LSE and coefficients as the loss would pass them; coefficients include a negative one
    logits = scale * image.float() @ texts.float().T
    row_lse, col_lse = logits.logsumexp(1), logits.logsumexp(0)
    col_coef = torch.linspace(-0.3, 0.9, n_cols, device=DEVICE)
    return image, texts, scale, bias, offset, row_lse, col_lse, torch.tensor(0.37, device=DEVICE), col_coef


def _as_lse(stats: tuple) -> tuple:
    """(row LSE, column LSE): the column max / sum-exp split itself is not unique."""
    row_lse, col_max, col_sum = stats
    return row_lse, col_max + col_sum.log()


def _compare(ops: TritonOps, b: int, n_cols: int, d: int, dtype: torch.dtype) -> None:
    image, texts, scale, bias, offset, row_lse, col_lse, row_coef, col_coef = _case(b, n_cols, d, dtype)
    twin = TwinOps(chunk_rows=16)
    tol = TOLERANCES[dtype]
    got = {
        "clip_stats": _as_lse(ops.clip_stats(image, texts, scale)),
        "clip_grads": ops.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef, offset),
        "siglip_row_loss": (ops.siglip_row_loss(image, texts, scale, bias, offset),),
        "siglip_grads": ops.siglip_grads(image, texts, scale, bias, row_coef, offset),
    }
    want = {
        "clip_stats": _as_lse(twin.clip_stats(image, texts, scale)),
        "clip_grads": twin.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef, offset),
        "siglip_row_loss": (twin.siglip_row_loss(image, texts, scale, bias, offset),),
        "siglip_grads": twin.siglip_grads(image, texts, scale, bias, row_coef, offset),
    }
    for name in want:
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
@pytest.mark.parametrize("b,n_cols,d", CPU_SHAPES)
@pytest.mark.parametrize("programs", [1, 3])
def test_interpreted_kernels_match_twin_fp32(b, n_cols, d, programs):
    _compare(TritonOps(max_programs=programs), b, n_cols, d, torch.float32)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
def test_interpreted_kernels_match_twin_bf16():
    _compare(TritonOps(max_programs=2), 19, 40, 45, torch.bfloat16)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    import kernels.contrastive as kc
    monkeypatch.setattr(kc, "INTERPRET", False)
    with pytest.raises(ValueError, match="torch_tiled"):
        TritonOps().clip_stats(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(1))


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("b,n_cols,d", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_twin(b, n_cols, d, dtype):
    _compare(TritonOps(), b, n_cols, d, dtype)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("b,d", [(1, 32), (777, 512), (2000, 1024)])
def test_cuda_loss_matches_open_clip(kind, b, d):
    from open_clip.loss import ClipLoss, SigLipLoss

    from dsclip.loss.config import LossConfig
    from dsclip.loss.contrastive import build_loss
    image, texts, scale, bias, *_ = _case(b, b, d, torch.float32)
    results = []
    for loss_fn in (build_loss(LossConfig(kind=kind, impl="triton")),
                    ClipLoss() if kind == "clip" else SigLipLoss()):
        leaves = [x.clone().requires_grad_() for x in (image, texts, scale, bias)]
        loss = loss_fn(*leaves)
        (loss * 1.7).backward()
        results.append([loss.detach()] + [x.grad for x in leaves[:3]] + ([leaves[3].grad] if kind == "siglip" else []))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
