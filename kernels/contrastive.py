"""Fused, tiled contrastive-loss kernels (CLIP softmax and SigLIP sigmoid) in Triton.

One rank holds image rows I (b x d) and all gathered texts T (B x d). The logits
S = scale * I @ T.T are only ever formed tile by tile (BLOCK_M x BLOCK_N), with fp32
accumulation whatever the input dtype (fp32, bf16 or fp16: low precision takes the tensor
cores). Four primitives, shared with the PyTorch twin (`dsclip_kernels.contrastive_twin.TwinOps`,
the reference for these kernels):

- clip_stats: row log-sum-exp (b) and this rank's column max / sum-exp (B) from one pass
  over the tiles (both directions from the same tiles).
- clip_grads: recomputes the tiles, forms dS = row_coef * (P_row - D) + (P_col - D) * col_coef
  (D = positive pairs: column offset + row) and returns the raw gradients dS @ T (b x d)
  and dS.T @ I (B x d).
- siglip_row_loss / siglip_grads: the same for softplus(-z * (S + bias)), z = +1 on pairs.

"Raw" gradients are w.r.t. the unscaled features' product: d_image = scale * raw_image,
d_texts = scale * raw_texts, and d_scale = sum(raw_image * I) = sum(raw_texts * T), so no
kernel needs the logit-scale gradient's own reduction.

Work split. Every kernel runs on a 2-D grid, (row blocks x column splits) forward and for
d_image, (column blocks x row splits) for d_texts, with the split count chosen so that the
programs launched reach `programs` (2 per SM) whatever b is. Each program writes only its own
slice of a partial buffer sized by that grid; the partials are merged by torch in a fixed
order. No atomics, no read of another launch's output: a launch's result depends on its
inputs alone, so every tile config gives the same answer on the first call, and two calls
give bit-identical gradients. Tile configs are chosen per shape bucket by `_TileTuner`, not
`triton.autotune`: the buffers depend on the config's tile sizes, which autotune fixes only
after the arguments are allocated.

Triton runs on CPU only under TRITON_INTERPRET=1, set before this module is imported.
"""
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
import triton.runtime.errors
import triton.testing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tiles:
    """One tile config: block sizes and the launch's warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def launch_args(self) -> dict[str, int]:
        sizes = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}
        return sizes if INTERPRET else {**sizes, "num_warps": self.num_warps, "num_stages": self.num_stages}


# The configs the tuner tries on a GPU. The interpreter gets one small config: it times nothing
# useful, and 32-wide tiles keep ragged tests small (tests force the GPU list there too).
GPU_TILES = [Tiles(64, 64, 32, 4, 3), Tiles(64, 128, 32, 4, 3), Tiles(128, 64, 32, 4, 3),
             Tiles(128, 128, 32, 8, 3), Tiles(128, 128, 64, 8, 2), Tiles(64, 64, 64, 4, 2)]
INTERPRETER_TILES = [Tiles(32, 32, 32)]


def tile_configs() -> list[Tiles]:
    return INTERPRETER_TILES if INTERPRET else GPU_TILES


# what triton.autotune also treats as "this config cannot run here"
_CONFIG_ERRORS = tuple(getattr(triton.runtime.errors, name) for name in ("OutOfResources", "PTXASError")
                       if hasattr(triton.runtime.errors, name))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


class _TileTuner:
    """Chooses the fastest tile config once per (primitive, dtype, shape bucket) by timing each.

    Every config's launch allocates its own outputs, so timing one leaves nothing behind that
    another reads, and the call that chose a config returns that config's own result.
    """

    def __init__(self, configs: list[Tiles]):
        self.configs = configs
        self.best: dict[tuple, Tiles] = {}

    def run(self, key: tuple, launch: Callable[[Tiles], Any], cuda: bool) -> Any:
        tiles = self.best.get(key)
        if tiles is None:
            tiles = self.configs[0] if len(self.configs) == 1 else self._fastest(key, launch, cuda)
            self.best[key] = tiles
        return launch(tiles)

    def _fastest(self, key: tuple, launch: Callable[[Tiles], Any], cuda: bool) -> Tiles:
        times = {}
        for tiles in self.configs:
            try:
                times[tiles] = _seconds(launch, tiles, cuda)
            except _CONFIG_ERRORS:  # a config this GPU cannot run (e.g. shared memory): not a candidate
                continue
        if not times:
            raise RuntimeError(f"no tile config compiles for {key} on this device; use loss.impl=torch_tiled")
        return min(times, key=times.get)


def _seconds(launch: Callable[[Tiles], Any], tiles: Tiles, cuda: bool) -> float:
    """One config's time for one launch (after a first, compiling one on CUDA). Long launches
    are timed once: do_bench's repeats would cost seconds per config at B = 256k."""
    if not cuda:
        began = time.perf_counter()
        launch(tiles)
        return time.perf_counter() - began
    launch(tiles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch(tiles)
    end.record()
    end.synchronize()
    once_ms = start.elapsed_time(end)
    return once_ms if once_ms >= 5 else triton.testing.do_bench(lambda: launch(tiles), warmup=5, rep=20)


@dataclass(frozen=True)
class _Split:
    """A 2-D grid over an (n_own x n_walk) tile space: `blocks` owned blocks, each of whose walk
    over the other side is cut into `splits` runs of `tiles_per_split` tiles."""
    blocks: int
    splits: int
    tiles_per_split: int

    @classmethod
    def of(cls, n_own: int, block_own: int, n_walk: int, block_walk: int, programs: int) -> "_Split":
        blocks, walk_tiles = triton.cdiv(n_own, block_own), triton.cdiv(n_walk, block_walk)
        wanted = min(max(1, triton.cdiv(programs, blocks)), walk_tiles)
        per_split = triton.cdiv(walk_tiles, wanted)
        return cls(blocks, triton.cdiv(walk_tiles, per_split), per_split)

    @property
    def grid(self) -> tuple[int, int]:
        return self.blocks, self.splits


# ---- device helpers -------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:  # the interpreter gives wrong bf16 dots: compute them in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # fp32 inputs: true fp32 products, not tf32
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when it is tiny (Goldberg's correction); Triton's libdevice
    # log1p does not run under the interpreter
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tile of I @ T.T in fp32; out-of-range rows/columns read as 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, dim, BLOCK_K):
        ks = k + offs_k
        k_ok = ks < dim
        a = tl.load(img_ptr + rows[:, None] * stride_i + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(txt_ptr + cols[None, :] * stride_t + ks[:, None],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, bt, acc, UPCAST, IEEE)
    return acc


@triton.jit
def _block(pid, BLOCK: tl.constexpr):
    """Indices of block `pid` as int64, so index x stride products cannot overflow int32."""
    return (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # the start itself is < n, so fits int32


@triton.jit
def _grad_tile(s, rows, cols, row_ok, col_ok, offset, bias, row_coef, row_lse_ptr, col_lse_ptr,
               col_coef_ptr, SIGLIP: tl.constexpr):
    """dLoss/dS on one tile of (scaled) logits s; 0 outside the valid rows and columns."""
    pair = (rows[:, None] + offset) == cols[None, :]
    if SIGLIP:
        z = tl.where(pair, 1.0, -1.0)
        ds = -z * tl.sigmoid(-z * (s + bias)) * row_coef
    else:
        row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
        col_lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
        col_coef = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)
        ds = row_coef * tl.exp(s - row_lse[:, None]) + col_coef[None, :] * tl.exp(s - col_lse[None, :])
        ds = tl.where(pair, ds - row_coef - col_coef[None, :], ds)
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


@triton.jit
def _add_product(out_ptr, own, own_ok, ds_low, src_ptr, src_rows, src_ok, dim, stride,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """out[own, :] += ds_low @ src[src_rows, :] in fp32, one BLOCK_K-wide slab of d at a time; `out`
    (d wide, contiguous) is the calling program's own slice, so no other program touches it."""
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, dim, BLOCK_K):
        ks = k + offs_k
        k_ok = ks < dim
        src = tl.load(src_ptr + src_rows[:, None] * stride + ks[None, :], mask=src_ok[:, None] & k_ok[None, :],
                      other=0.0)
        where = out_ptr + own[:, None] * dim + ks[None, :]
        mask = own_ok[:, None] & k_ok[None, :]
        tl.store(where, _mma(ds_low, src, tl.load(where, mask=mask, other=0.0), UPCAST, IEEE), mask=mask)


# ---- forward kernels ------------------------------------------------------------------------

@triton.jit
def _clip_stats_kernel(img_ptr, txt_ptr, scale_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                       n_rows, n_cols, dim, stride_i, stride_t, tiles_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (row block m, column split c): the online max / sum-exp of its rows over the
    # split's column tiles goes to row c of the (splits x b) row partials; each column tile's
    # max / sum-exp over the block's rows goes to row m of the (row blocks x B) column partials.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    rows = _block(pid_m, BLOCK_M)
    row_ok = rows < n_rows
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_c * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))
    col_stats = pid_m.to(tl.int64) * n_cols
    for cb in range(first, last):
        cols = _block(cb, BLOCK_N)
        col_ok = cols < n_cols
        s = scale * _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i,
                              stride_t, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        s_row = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_row, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_row - m_new[:, None]), 1)
        m_i = m_new
        s_col = tl.where(row_ok[:, None], s, float("-inf"))
        tile_max = tl.max(s_col, 0)
        tl.store(col_max_ptr + col_stats + cols, tile_max, mask=col_ok)
        tl.store(col_sum_ptr + col_stats + cols, tl.sum(tl.exp(s_col - tile_max[None, :]), 0), mask=col_ok)
    row_stats = pid_c.to(tl.int64) * n_rows
    tl.store(row_max_ptr + row_stats + rows, m_i, mask=row_ok)
    tl.store(row_sum_ptr + row_stats + rows, l_i, mask=row_ok)


@triton.jit
def _siglip_loss_kernel(img_ptr, txt_ptr, scale_ptr, bias_ptr, row_loss_ptr,
                        n_rows, n_cols, dim, offset, stride_i, stride_t, tiles_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (row block m, column split c) sums its rows' losses over the split's column tiles
    # into row c of the (splits x b) partials.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = _block(pid_m, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_c * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))
    for cb in range(first, last):
        cols = _block(cb, BLOCK_N)
        col_ok = cols < n_cols
        x = _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
                      BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        t = tl.where((rows[:, None] + offset) == cols[None, :], 1.0, -1.0) * -(scale * x + bias)
        softplus = tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))
        acc += tl.sum(tl.where(col_ok[None, :], softplus, 0.0), 1)
    tl.store(row_loss_ptr + pid_c.to(tl.int64) * n_rows + rows, acc, mask=row_ok)


# ---- backward kernels (the FlashAttention-2 split: one owns rows, one owns columns) ----------

@triton.jit
def _image_grads_kernel(img_ptr, txt_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, row_coef_ptr,
                        col_coef_ptr, ds_scale_ptr, d_img_ptr, d_sum_ptr, n_rows, n_cols, dim, offset, stride_i, stride_t,
                        tiles_per_split, SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (row block m, column split c) owns rows m of slice c of the (splits x b x d) d_image
    # partials: it recomputes its tiles and adds dS @ T into them, in column order.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = _block(pid_m, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    row_coef = tl.load(row_coef_ptr).to(tl.float32)
    ds_scale = tl.load(ds_scale_ptr)
    out = d_img_ptr + pid_c.to(tl.int64) * n_rows * dim
    d_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = pid_c * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))
    for cb in range(first, last):
        # the previous tile's stores of this slice are read back below, by other threads of the program
        tl.debug_barrier()
        cols = _block(cb, BLOCK_N)
        col_ok = cols < n_cols
        s = scale * _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        ds = _grad_tile(s, rows, cols, row_ok, col_ok, offset, bias, row_coef, row_lse_ptr, col_lse_ptr,
                        col_coef_ptr, SIGLIP)
        d_sum += tl.sum(ds, 1)
        ds_low = (ds * ds_scale).to(txt_ptr.dtype.element_ty)
        _add_product(out, rows, row_ok, ds_low, txt_ptr, cols, col_ok, dim, stride_t, BLOCK_K, UPCAST, IEEE)
    tl.store(d_sum_ptr + pid_c.to(tl.int64) * n_rows + rows, d_sum, mask=row_ok)


@triton.jit
def _text_grads_kernel(img_ptr, txt_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, row_coef_ptr,
                       col_coef_ptr, ds_scale_ptr, d_txt_ptr, d_sum_ptr, n_rows, n_cols, dim, offset, stride_i, stride_t,
                       tiles_per_split, SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (column block n, row split r) owns columns n of slice r of the (splits x B x d)
    # d_texts partials: it recomputes its tiles and adds dS.T @ I into them, in row order.
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = _block(pid_n, BLOCK_N)
    col_ok = cols < n_cols
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    row_coef = tl.load(row_coef_ptr).to(tl.float32)
    ds_scale = tl.load(ds_scale_ptr)
    out = d_txt_ptr + pid_r.to(tl.int64) * n_cols * dim
    d_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid_r * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_rows, BLOCK_M))
    for rb in range(first, last):
        tl.debug_barrier()  # as in _image_grads_kernel: stores of the previous tile are read back
        rows = _block(rb, BLOCK_M)
        row_ok = rows < n_rows
        s = scale * _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        ds = _grad_tile(s, rows, cols, row_ok, col_ok, offset, bias, row_coef, row_lse_ptr, col_lse_ptr,
                        col_coef_ptr, SIGLIP)
        d_sum += tl.sum(ds, 0)
        ds_low = tl.trans(ds * ds_scale).to(img_ptr.dtype.element_ty)
        _add_product(out, cols, col_ok, ds_low, img_ptr, rows, row_ok, dim, stride_i, BLOCK_K, UPCAST, IEEE)
    tl.store(d_sum_ptr + pid_r.to(tl.int64) * n_cols + cols, d_sum, mask=col_ok)


# ---- host side ------------------------------------------------------------------------------

def _check(image: torch.Tensor, texts: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if image.dim() != 2 or texts.dim() != 2 or image.shape[1] != texts.shape[1]:
        raise ValueError(f"features must be (b, d) and (B, d); got {tuple(image.shape)} and {tuple(texts.shape)}")
    if image.shape[0] == 0 or texts.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty features {tuple(image.shape)} and {tuple(texts.shape)}: the loss needs at least "
                         "one image-text pair per rank (check data.batch_size and the last, partial batch)")
    if image.dtype != texts.dtype or image.dtype not in DTYPES:
        raise ValueError(f"feature dtypes must match and be float32, bfloat16 or float16; got {image.dtype}, {texts.dtype}")
    if not (image.is_cuda or INTERPRET):
        raise ValueError("Triton loss kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use loss.impl=torch_tiled on CPU")
    if not 0 <= offset <= texts.shape[0] - image.shape[0]:
        raise ValueError(f"offset={offset} puts the {image.shape[0]} positive pairs outside {texts.shape[0]} texts")
    return image.contiguous(), texts.contiguous()


def _flags(x: torch.Tensor) -> dict:
    fp32 = x.dtype == torch.float32
    return {"UPCAST": INTERPRET and not fp32, "IEEE": fp32 or INTERPRET}


def _scalar(x: torch.Tensor) -> torch.Tensor:
    """A 1-element fp32 device tensor the kernels read by pointer (no host sync)."""
    return x.detach().reshape(1).float().contiguous()


def _fp16_gradient_scale(row_coef: torch.Tensor, col_coef: torch.Tensor) -> torch.Tensor:
    """A power of two that lifts the gradient tile dS into fp16's range before the tensor-core
    products: its entries are coefficient x probability, about 1 / (b x B) for the negatives,
    which fp16 (smallest subnormal 6e-8) would flush to zero from B of a few thousand. The
    largest |dS| is at most the largest coefficient, mapped to 2^13 (fp16 reaches 65504).
    Computed on the device: no host sync."""
    largest = torch.maximum(row_coef.detach().float().abs().reshape(()), col_coef.abs().max())
    exponent = 13 - torch.ceil(torch.log2(largest.clamp_min(2.0 ** -100)))
    return torch.exp2(exponent.clamp(-100, 100)).reshape(1)


def _unscaled(grad: torch.Tensor, ds_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return grad if ds_scale is None else grad / ds_scale


def _merge_lse_parts(maxes: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max / sum-exp over dim 0 of partial (max, sum-exp) pairs."""
    merged = maxes.amax(0)
    return merged, (sums * (maxes - merged).exp()).sum(0)


class TritonOps:
    """The four tiled contrastive primitives as Triton kernels (see module docstring)."""

    def __init__(self, programs: int = 0, configs: Optional[list[Tiles]] = None):
        # programs: how many programs a launch aims for (0: 2 per SM on CUDA, 4 in the interpreter);
        # configs: the tile configs to tune over (default: tile_configs())
        self.programs = programs
        self.tuner = _TileTuner(configs or tile_configs())

    def clip_stats(self, image: torch.Tensor, texts: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, texts = _check(image, texts)
        b, n_cols, dim = image.shape[0], texts.shape[0], image.shape[1]

        def launch(t: Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            split = _Split.of(b, t.block_m, n_cols, t.block_n, self._programs(image))
            row_max, row_sum = (image.new_empty((split.splits, b), dtype=torch.float32) for _ in range(2))
            col_max, col_sum = (image.new_empty((split.blocks, n_cols), dtype=torch.float32) for _ in range(2))
            _clip_stats_kernel[split.grid](image, texts, _scalar(scale), row_max, row_sum, col_max, col_sum,
                                           b, n_cols, dim, image.stride(0), texts.stride(0), split.tiles_per_split,
                                           **_flags(image), **t.launch_args())
            row_max, row_sum = _merge_lse_parts(row_max, row_sum)
            return (row_max + row_sum.log(), *_merge_lse_parts(col_max, col_sum))

        return self.tuner.run(("clip_stats", *self._key(image, texts)), launch, image.is_cuda)

    def clip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                   row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor,
                   col_coef: torch.Tensor, offset: int, need_image: bool = True,
                   need_texts: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        image, texts = _check(image, texts, offset)
        zero = torch.zeros(1, device=image.device)
        d_image, d_texts, _ = self._grads(image, texts, scale, zero, row_lse.float().contiguous(),
                                          col_lse.float().contiguous(), row_coef, col_coef.float().contiguous(),
                                          offset, False, need_image, need_texts)
        return d_image, d_texts

    def siglip_row_loss(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor, offset: int) -> torch.Tensor:
        image, texts = _check(image, texts, offset)
        b, n_cols, dim = image.shape[0], texts.shape[0], image.shape[1]

        def launch(t: Tiles) -> torch.Tensor:
            split = _Split.of(b, t.block_m, n_cols, t.block_n, self._programs(image))
            row_loss = image.new_empty((split.splits, b), dtype=torch.float32)
            _siglip_loss_kernel[split.grid](image, texts, _scalar(scale), _scalar(bias), row_loss, b, n_cols, dim,
                                            offset, image.stride(0), texts.stride(0), split.tiles_per_split,
                                            **_flags(image), **t.launch_args())
            return row_loss.sum(0)

        return self.tuner.run(("siglip_row_loss", *self._key(image, texts)), launch, image.is_cuda)

    def siglip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, coef: torch.Tensor, offset: int, need_image: bool = True,
                     need_texts: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        image, texts = _check(image, texts, offset)
        unused = torch.zeros(1, device=image.device)
        return self._grads(image, texts, scale, bias, unused, unused, coef, unused, offset, True,
                           need_image, need_texts)

    def _grads(self, image, texts, scale, bias, row_lse, col_lse, row_coef, col_coef, offset, siglip,
               need_image, need_texts):
        """Raw (d_image or None, d_texts or None, sum of dS). With neither side needed, the texts'
        pass still runs: sum(dS) and the scale's gradient come from it."""
        b, n_cols, dim = image.shape[0], texts.shape[0], image.shape[1]
        need_texts = need_texts or not need_image
        ds_scale = _fp16_gradient_scale(row_coef, col_coef) if image.dtype == torch.float16 else None
        inputs = (image, texts, _scalar(scale), _scalar(bias), row_lse, col_lse, _scalar(row_coef), col_coef,
                  torch.ones(1, device=image.device) if ds_scale is None else ds_scale)
        sizes = (b, n_cols, dim, offset, image.stride(0), texts.stride(0))
        key = self._key(image, texts)

        def image_pass(t: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
            split = _Split.of(b, t.block_m, n_cols, t.block_n, self._programs(image))
            d_img = torch.zeros(split.splits, b, dim, dtype=torch.float32, device=image.device)
            d_sum = image.new_empty((split.splits, b), dtype=torch.float32)
            _image_grads_kernel[split.grid](*inputs, d_img, d_sum, *sizes, split.tiles_per_split,
                                            SIGLIP=siglip, **_flags(image), **t.launch_args())
            return _unscaled(d_img.sum(0), ds_scale), d_sum.sum()

        def text_pass(t: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
            split = _Split.of(n_cols, t.block_n, b, t.block_m, self._programs(image))
            d_txt = torch.zeros(split.splits, n_cols, dim, dtype=torch.float32, device=image.device)
            d_sum = image.new_empty((split.splits, n_cols), dtype=torch.float32)
            _text_grads_kernel[split.grid](*inputs, d_txt, d_sum, *sizes, split.tiles_per_split,
                                           SIGLIP=siglip, **_flags(image), **t.launch_args())
            return _unscaled(d_txt.sum(0), ds_scale), d_sum.sum()

        kind = "siglip" if siglip else "clip"
        d_image = d_texts = d_sum = None
        if need_image:
            d_image, d_sum = self.tuner.run((kind, "image_grads", *key), image_pass, image.is_cuda)
        if need_texts:
            d_texts, text_sum = self.tuner.run((kind, "text_grads", *key), text_pass, image.is_cuda)
            d_sum = text_sum if d_sum is None else d_sum
        return d_image, d_texts, d_sum.reshape(())

    def _programs(self, x: torch.Tensor) -> int:
        if self.programs:
            return self.programs
        return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4

    @staticmethod
    def _key(image: torch.Tensor, texts: torch.Tensor) -> tuple:
        return image.dtype, _bucket(image.shape[0]), _bucket(texts.shape[0]), image.shape[1]
