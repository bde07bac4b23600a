"""Fused, tiled contrastive-loss kernels (CLIP softmax and SigLIP sigmoid) in Triton.

One rank holds image rows I (b x d) and all gathered texts T (B x d). The logits
S = scale * I @ T.T are only ever formed tile by tile (BLOCK_M x BLOCK_N), with fp32
accumulation whatever the input dtype (fp32 or bf16). Four primitives, shared with the
PyTorch twin (`kernels.contrastive_twin.TwinOps`, the reference for these kernels):

- clip_stats: row log-sum-exp (b) and this rank's partial column max / sum-exp (B), from
  one pass over the tiles (both directions from the same tiles).
- clip_grads: recomputes the tiles, forms dS = row_coef * (P_row - D) + (P_col - D) * col_coef
  (D = positive pairs: column offset + row) and returns the raw gradients dS @ T (b x d)
  and dS.T @ I (B x d) in the same pass.
- siglip_row_loss / siglip_grads: the same for softplus(-z * (S + bias)), z = +1 on pairs.

"Raw" gradients are w.r.t. the unscaled features' product: d_image = scale * raw_image,
d_texts = scale * raw_texts, and d_scale = sum(raw_image * I), so no kernel needs the
logit-scale gradient's own reduction. Triton runs on CPU only under TRITON_INTERPRET=1,
set before this module is imported.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _tile_configs() -> list[triton.Config]:
    if INTERPRET:  # numpy interpreter: one config, big enough to be quick, small enough for ragged tests
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [
            (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3),
            (128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (64, 64, 64, 4, 2),
        ]
    ]


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


@triton.autotune(configs=_tile_configs(), key=["n_cols", "dim"])
@triton.jit
def _clip_stats_kernel(img_ptr, txt_ptr, scale_ptr, row_lse_ptr, col_max_ptr, col_sum_ptr,
                       n_rows, n_cols, dim, stride_i, stride_t,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Persistent programs: program p owns row p of the (programs x B) column-stat buffers,
    # so the partial column LSE costs O(programs x B) memory, not O(b/BLOCK_M x B).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    scale = tl.load(scale_ptr).to(tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    stats = pid * n_cols
    for rb in range(pid, tl.cdiv(n_rows, BLOCK_M), n_prog):
        rows = rb * BLOCK_M + offs_m
        row_ok = rows < n_rows
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for cb in range(0, tl.cdiv(n_cols, BLOCK_N)):
            cols = cb * BLOCK_N + offs_n
            col_ok = cols < n_cols
            s = scale * _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i,
                                  stride_t, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
            # online row LSE over column tiles
            s_row = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_row, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_row - m_new[:, None]), 1)
            m_i = m_new
            # merge this tile's column stats into the program's running ones
            s_col = tl.where(row_ok[:, None], s, float("-inf"))
            tile_max = tl.max(s_col, 0)
            keep = col_ok & (rb != pid)
            old_max = tl.load(col_max_ptr + stats + cols, mask=keep, other=float("-inf"))
            old_sum = tl.load(col_sum_ptr + stats + cols, mask=keep, other=0.0)
            new_max = tl.maximum(old_max, tile_max)
            new_sum = old_sum * tl.exp(old_max - new_max) + tl.sum(tl.exp(s_col - new_max[None, :]), 0)
            tl.store(col_max_ptr + stats + cols, new_max, mask=col_ok)
            tl.store(col_sum_ptr + stats + cols, new_sum, mask=col_ok)
        tl.store(row_lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)
        # stats written by some threads are read by others on the next row block
        tl.debug_barrier()


@triton.autotune(configs=_tile_configs(), key=["n_cols", "dim"])
@triton.jit
def _siglip_loss_kernel(img_ptr, txt_ptr, scale_ptr, bias_ptr, row_loss_ptr,
                        n_rows, n_cols, dim, offset, stride_i, stride_t,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for cb in range(0, tl.cdiv(n_cols, BLOCK_N)):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        x = _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
                      BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        t = tl.where((rows[:, None] + offset) == cols[None, :], 1.0, -1.0) * -(scale * x + bias)
        softplus = tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t)))
        acc += tl.sum(tl.where(col_ok[None, :], softplus, 0.0), 1)
    tl.store(row_loss_ptr + rows, acc, mask=row_ok)


@triton.autotune(configs=_tile_configs(), key=["n_cols", "dim", "SIGLIP"],
                 reset_to_zero=["d_img_ptr", "d_txt_ptr", "d_bias_ptr"])
@triton.jit
def _grads_kernel(img_ptr, txt_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr,
                  row_coef_ptr, col_coef_ptr, d_img_ptr, d_txt_ptr, d_bias_ptr,
                  n_rows, n_cols, dim, offset, stride_i, stride_t,
                  SIGLIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # One tile per program: recompute S, form dS, and add dS @ T and dS.T @ I (fp32 atomics)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    valid = row_ok[:, None] & col_ok[None, :]
    pair = (rows[:, None] + offset) == cols[None, :]
    scale = tl.load(scale_ptr).to(tl.float32)
    row_coef = tl.load(row_coef_ptr).to(tl.float32)
    s = scale * _dot_tile(img_ptr, txt_ptr, rows, cols, row_ok, col_ok, dim, stride_i, stride_t,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
    if SIGLIP:
        z = tl.where(pair, 1.0, -1.0)
        ds = -z * tl.sigmoid(-z * (s + tl.load(bias_ptr).to(tl.float32))) * row_coef
        ds = tl.where(valid, ds, 0.0)
        tl.atomic_add(d_bias_ptr, tl.sum(tl.sum(ds, 1), 0))
    else:
        row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
        col_lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
        col_coef = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)
        ds = row_coef * tl.exp(s - row_lse[:, None]) + col_coef[None, :] * tl.exp(s - col_lse[None, :])
        ds = tl.where(pair, ds - row_coef - col_coef[None, :], ds)
        ds = tl.where(valid, ds, 0.0)
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(0, dim, BLOCK_K):
        ks = k + offs_k
        k_ok = ks < dim
        img = tl.load(img_ptr + rows[:, None] * stride_i + ks[None, :],
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        txt = tl.load(txt_ptr + cols[:, None] * stride_t + ks[None, :],
                      mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        d_img = _mma(ds.to(txt.dtype), txt, tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), UPCAST, IEEE)
        d_txt = _mma(tl.trans(ds).to(img.dtype), img, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32),
                     UPCAST, IEEE)
        tl.atomic_add(d_img_ptr + rows[:, None] * dim + ks[None, :], d_img,
                      mask=row_ok[:, None] & k_ok[None, :])
        tl.atomic_add(d_txt_ptr + cols[:, None] * dim + ks[None, :], d_txt,
                      mask=col_ok[:, None] & k_ok[None, :])


def _check(image: torch.Tensor, texts: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if image.dim() != 2 or texts.dim() != 2 or image.shape[1] != texts.shape[1]:
        raise ValueError(f"features must be (b, d) and (B, d); got {tuple(image.shape)} and {tuple(texts.shape)}")
    if image.dtype != texts.dtype or image.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"feature dtypes must both be float32 or bfloat16; got {image.dtype}, {texts.dtype}")
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


class TritonOps:
    """The four tiled contrastive primitives as Triton kernels (see module docstring)."""

    def __init__(self, max_programs: int = 0):
        # 0: one persistent stats program per SM (x2); tests set small counts to exercise merging
        self.max_programs = max_programs

    def clip_stats(self, image: torch.Tensor, texts: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, texts = _check(image, texts)
        b, n_cols = image.shape[0], texts.shape[0]
        programs = self.max_programs or (
            2 * torch.cuda.get_device_properties(image.device).multi_processor_count if image.is_cuda else 2)
        row_lse = torch.empty(b, dtype=torch.float32, device=image.device)
        # (programs x B) partial column stats, merged below: O(B) memory for a fixed program count
        col_max = torch.full((programs, n_cols), float("-inf"), dtype=torch.float32, device=image.device)
        col_sum = torch.zeros(programs, n_cols, dtype=torch.float32, device=image.device)
        grid = lambda meta: (min(programs, triton.cdiv(b, meta["BLOCK_M"])),)  # noqa: E731
        _clip_stats_kernel[grid](image, texts, _scalar(scale), row_lse, col_max, col_sum,
                                 b, n_cols, image.shape[1], image.stride(0), texts.stride(0), **_flags(image))
        merged_max = col_max.amax(0)
        merged_sum = (col_sum * (col_max - merged_max).exp()).sum(0)
        return row_lse, merged_max, merged_sum

    def clip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                   row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor,
                   col_coef: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, texts = _check(image, texts, offset)
        d_image, d_texts, _ = self._grads(image, texts, scale, torch.zeros(1, device=image.device),
                                          row_lse.float().contiguous(), col_lse.float().contiguous(),
                                          row_coef, col_coef.float().contiguous(), offset, siglip=False)
        return d_image, d_texts

    def siglip_row_loss(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor, offset: int) -> torch.Tensor:
        image, texts = _check(image, texts, offset)
        b, n_cols = image.shape[0], texts.shape[0]
        row_loss = torch.empty(b, dtype=torch.float32, device=image.device)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)  # noqa: E731
        _siglip_loss_kernel[grid](image, texts, _scalar(scale), _scalar(bias), row_loss, b, n_cols,
                                  image.shape[1], offset, image.stride(0), texts.stride(0), **_flags(image))
        return row_loss

    def siglip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, coef: torch.Tensor,
                     offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, texts = _check(image, texts, offset)
        unused = torch.zeros(1, device=image.device)
        return self._grads(image, texts, scale, bias, unused, unused, coef, unused, offset, siglip=True)

    @staticmethod
    def _grads(image, texts, scale, bias, row_lse, col_lse, row_coef, col_coef, offset, siglip):
        b, n_cols, dim = image.shape[0], texts.shape[0], image.shape[1]
        d_image = torch.zeros(b, dim, dtype=torch.float32, device=image.device)
        d_texts = torch.zeros(n_cols, dim, dtype=torch.float32, device=image.device)
        d_bias = torch.zeros(1, dtype=torch.float32, device=image.device)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))  # noqa: E731
        _grads_kernel[grid](image, texts, _scalar(scale), _scalar(bias), row_lse, col_lse,
                            _scalar(row_coef), col_coef, d_image, d_texts, d_bias,
                            b, n_cols, dim, offset, image.stride(0), texts.stride(0),
                            SIGLIP=siglip, **_flags(image))
        return d_image, d_texts, d_bias.reshape(())
