"""Parity of the Triton contrastive kernels with their PyTorch twin, primitive by primitive:
every tile config on the first call per shape, the 2-D work split at ragged sizes, bit-identical
repeats, skipped sides, bad input, and the once-per-process self-check.

On CPU the kernels run in the Triton interpreter (tests/conftest.py), so shapes stay tiny;
`-m gpu` runs the same table plus larger shapes on CUDA for real. Nothing here imports
open_clip, so the file runs on a bare GPU machine with torch and triton alone.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

import dsclip_kernels.contrastive as kc
from dsclip.errors import LossKernelError
from dsclip.loss.self_check import check_against_twin
from dsclip_kernels.contrastive import GPU_TILES, TritonOps
from dsclip_kernels.contrastive_twin import TwinOps

# dtype -> tolerances of the kernels against the fp32 twin fed the same (rounded) inputs
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
              torch.float16: {"atol": 5e-3, "rtol": 5e-3}}
CPU_SHAPES = [(1, 1, 32), (1, 40, 32), (19, 40, 45), (40, 40, 64), (70, 150, 45)]  # (b, B, d): ragged vs 32-wide tiles
GPU_SHAPES = [(1, 3, 32), (257, 514, 77), (1000, 2000, 512), (333, 999, 1024)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

gpu = pytest.mark.gpu
# What only a GPU checks: compiled kernels (not the interpreter's numpy), bf16 / fp16 tensor-core
# products (the interpreter upcasts tiles to fp32 before tl.dot), the tuner timing real configs.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs CUDA: only a GPU compiles the kernels and runs their bf16 / fp16 tensor-core products "
    "(the interpreter upcasts to fp32)"))


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


def _outputs(ops, case: tuple, **need: bool) -> dict[str, tuple]:
    """Every primitive's outputs on one case (`need`: the grads' need_image / need_texts)."""
    image, texts, scale, bias, offset, row_lse, col_lse, row_coef, col_coef = case
    return {
        "clip_stats": _as_lse(ops.clip_stats(image, texts, scale)),
        "clip_grads": ops.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef, offset, **need),
        "siglip_row_loss": (ops.siglip_row_loss(image, texts, scale, bias, offset),),
        "siglip_grads": ops.siglip_grads(image, texts, scale, bias, row_coef, offset, **need),
    }


def _compare(ops: TritonOps, b: int, n_cols: int, d: int, dtype: torch.dtype) -> None:
    """The first call per shape (which tunes, where there is more than one config) against the twin."""
    case = _case(b, n_cols, d, dtype)
    tol = TOLERANCES[dtype]
    got, want = _outputs(ops, case), _outputs(TwinOps(chunk_rows=16), case)
    for name in want:
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
@pytest.mark.parametrize("b,n_cols,d", CPU_SHAPES)
@pytest.mark.parametrize("programs", [1, 3])  # 1: no split; 3: 2-D grids with ragged last splits
def test_interpreted_kernels_match_twin_fp32(b, n_cols, d, programs):
    _compare(TritonOps(programs=programs), b, n_cols, d, torch.float32)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_kernels_match_twin_low_precision(dtype):
    # The interpreter's bf16 dot is unreliable, so there the tiles upcast to fp32 before tl.dot:
    # this checks the low-precision loads, casts and stores; only a GPU runs the bf16 / fp16 MMA.
    _compare(TritonOps(programs=3), 40, 70, 45, dtype)


@pytest.mark.parametrize("batch", [16384, 262144])
def test_fp16_gradients_keep_the_negatives_of_a_large_batch(batch):
    # Training coefficients are about 1 / (2b) and negatives' probabilities about 1 / B: fp16
    # products of dS (smallest subnormal 6e-8) would drop them unless dS is scaled up first.
    image, texts, scale, bias, offset, row_lse, col_lse, row_coef, col_coef = _case(40, 150, 45, torch.float16)
    row_coef, col_coef = row_coef / (2 * batch), col_coef / (2 * batch)
    ops, twin = TritonOps(programs=3), TwinOps(chunk_rows=16)
    got = ops.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef, offset) + \
        ops.siglip_grads(image, texts, scale, bias, row_coef, offset)[:2]
    want = twin.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef, offset) + \
        twin.siglip_grads(image, texts, scale, bias, row_coef, offset)[:2]
    for g, w in zip(got, want):
        assert ((g - w).abs().max() / w.abs().max()).item() < 1e-3


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
@pytest.mark.parametrize("tiles", GPU_TILES, ids=lambda t: f"{t.block_m}x{t.block_n}x{t.block_k}")
def test_every_gpu_tile_config_is_right_on_its_first_call(tiles):
    # b, B and d are multiples of no block; 7 programs split both grids, the last split short
    _compare(TritonOps(programs=7, configs=[tiles]), 70, 150, 45, torch.float32)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter table; the gpu table covers CUDA")
@pytest.mark.parametrize("winner", [GPU_TILES[0], GPU_TILES[4]], ids=["narrowest_wins", "widest_wins"])
def test_the_tuner_over_every_gpu_config_is_right_on_the_first_call_per_shape(winner, monkeypatch):
    # The tuner launches every config (each trial on the real inputs) and keeps the fastest; the
    # interpreter's timings are not a GPU's, so the winner is set here, once the narrowest and once
    # the widest: whatever the trial launches left behind must not reach the winner's result.
    timed = []

    def seconds(launch, tiles, cuda):
        launch(tiles)
        timed.append(tiles)
        return 0.0 if tiles == winner else 1.0

    monkeypatch.setattr(kc, "_seconds", seconds)
    ops = TritonOps(programs=2, configs=GPU_TILES)
    for b, n_cols, d in [(77, 130, 40), (1, 70, 33)]:  # 77 rows: 2 row blocks at 64 wide, 1 at 128
        _compare(ops, b, n_cols, d, torch.float32)
    # per shape bucket: clip stats, siglip loss, and the image and text gradient passes of each
    assert len(ops.tuner.best) == 2 * 6 and set(ops.tuner.best.values()) == {winner}
    assert len(timed) == 2 * 6 * len(GPU_TILES), "every config tried once per primitive and shape"


def test_gradients_are_bit_identical_run_to_run():
    ops, case = TritonOps(programs=3), _case(40, 70, 45, torch.float32)
    first, second = _outputs(ops, case), _outputs(ops, case)
    for name in first:
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name])), name
    twin = TwinOps(chunk_rows=16)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(twin, case)["clip_grads"], _outputs(twin, case)["clip_grads"]))


def test_the_kernels_accumulate_without_atomics():
    # atomics make the sum order (and so the gradients) change run to run on a GPU, where the
    # interpreter's sequential programs would hide it
    assert "tl.atomic" not in inspect.getsource(kc)


@pytest.mark.parametrize("ops", [TritonOps(programs=3), TwinOps(chunk_rows=16)], ids=["triton", "twin"])
def test_a_side_that_needs_no_gradient_is_skipped(ops):
    case = _case(40, 70, 45, torch.float32)
    both = _outputs(ops, case)
    texts_only = _outputs(ops, case, need_image=False)
    image_only = _outputs(ops, case, need_texts=False)
    for name in ("clip_grads", "siglip_grads"):
        assert texts_only[name][0] is None and image_only[name][1] is None
        torch.testing.assert_close(texts_only[name][1], both[name][1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(image_only[name][0], both[name][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(texts_only["siglip_grads"][2], both["siglip_grads"][2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("image,texts", [((0, 8), (4, 8)), ((2, 8), (0, 8)), ((2, 0), (2, 0))])
def test_empty_features_are_refused(image, texts):
    with pytest.raises(ValueError, match="empty features"):
        TritonOps().clip_stats(torch.zeros(image), torch.zeros(texts), torch.ones(1))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(kc, "INTERPRET", False)
    with pytest.raises(ValueError, match="torch_tiled"):
        TritonOps().clip_stats(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(1))


@gpu
@needs_cuda
@pytest.mark.parametrize("b,n_cols,d", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_twin(b, n_cols, d, dtype):
    _compare(TritonOps(), b, n_cols, d, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("tiles", GPU_TILES, ids=lambda t: f"{t.block_m}x{t.block_n}x{t.block_k}")
def test_cuda_every_tile_config_is_right_on_its_first_call(tiles):
    for dtype in (torch.float32, torch.bfloat16):
        _compare(TritonOps(configs=[tiles]), 257, 514, 77, dtype)


@gpu
@needs_cuda
def test_cuda_gradients_are_bit_identical_run_to_run():
    ops, case = TritonOps(), _case(1000, 4000, 512, torch.bfloat16)
    first, second = _outputs(ops, case), _outputs(ops, case)
    for name in first:
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name])), name


class _WrongStats(TritonOps):
    """A kernel build whose column statistics are off, as a miscompiled tile config would be."""

    def clip_stats(self, image, texts, scale):
        row_lse, col_max, col_sum = super().clip_stats(image, texts, scale)
        return row_lse, col_max + 0.5, col_sum


def test_the_self_check_passes_the_kernels_and_stops_a_wrong_build():
    check_against_twin(TritonOps(programs=3), torch.device(DEVICE), torch.float32, force=True)
    with pytest.raises(LossKernelError, match=r"clip column lse: error 0\.\d+ relative.*loss\.impl=torch_tiled"):
        check_against_twin(_WrongStats(programs=3), torch.device(DEVICE), torch.float32, force=True)
