"""Pure-PyTorch twin of the tiled contrastive kernels: same math, row chunks instead of tiles.

Used on CPU and as the Triton kernels' test oracle. Every function sees one rank's image
rows (b x d) against all gathered texts (B x d); no (b x B) logits matrix is ever held,
only two (chunk x B) fp32 work buffers. Gradients come back "raw" per the contract of
`dsclip_kernels.contrastive` (see its module docstring): the caller never needs the logits.
"""
from typing import Optional

import torch
import torch.nn.functional as F

# fp32 exp(x) keeps full relative precision down to x = -87.3 (then denormals, then 0). The
# GEMV column sums multiply p_ij = exp(S_ij - lse_i) by exp(lse_i - m): a term is lost only
# below exp(-87.3 + m - max_i S_ij) of its column's largest, under 1e-7 while m (the chunk's
# largest row LSE) exceeds every column's max by at most this much.
_GEMV_SPREAD = 70.0


class TwinOps:
    """CPU/any-device implementation of the four tiled contrastive primitives."""

    def __init__(self, chunk_rows: int = 1024):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
        self.chunk_rows = chunk_rows

    def clip_stats(self, image: torch.Tensor, texts: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row LSE (b) of S = scale * image @ texts.T, and this rank's column max / sum-exp (B).

        One exp pass per chunk: row softmax P gives the row LSE, and the column sums come
        from a GEMV, sum_i exp(S_ij - m) = P[:, j] . exp(lse - m). A chunk whose logits spread
        too far for that (see `_GEMV_SPREAD`) takes a second, per-column-shifted exp pass.
        The spread check reads one float on the host (free on CPU, a sync on CUDA).
        """
        b, n_cols = image.shape[0], texts.shape[0]
        txt = texts.float()
        s = scale.float().reshape(())
        row_lse = torch.empty(b, dtype=torch.float32, device=image.device)
        col_max = torch.full((n_cols,), float("-inf"), dtype=torch.float32, device=image.device)
        col_sum = torch.zeros(n_cols, dtype=torch.float32, device=image.device)
        logits, work = self._buffers(b, n_cols, image.device)
        for start in range(0, b, self.chunk_rows):
            img = image[start:start + self.chunk_rows].float() * s
            n = img.shape[0]
            chunk, probs = logits[:n], work[:n]
            torch.mm(img, txt.T, out=chunk)  # (n, B) tile of logits, never materialised whole
            torch.softmax(chunk, 1, out=probs)  # one fused max / exp / sum / scale kernel
            lse = chunk.amax(1) - probs.amax(1).log()  # a row's largest p is exp(max - lse)
            row_lse[start:start + n] = lse
            tile_max = chunk.amax(0)
            shift = lse.max()
            if shift - tile_max.min() <= _GEMV_SPREAD:
                tile_sum = torch.mv(probs.T, (lse - shift).exp())
                tile_max = shift.expand(n_cols)
            else:
                tile_sum = torch.sub(chunk, tile_max, out=probs).exp_().sum(0)
            new_max = torch.maximum(col_max, tile_max)
            col_sum = col_sum * (col_max - new_max).exp() + tile_sum * (tile_max - new_max).exp()
            col_max = new_max
        return row_lse, col_max, col_sum

    def clip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                   row_lse: torch.Tensor, col_lse: torch.Tensor, row_coef: torch.Tensor,
                   col_coef: torch.Tensor, offset: int, need_image: bool = True,
                   need_texts: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Raw gradients (dS @ T, dS.T @ I) for dS = row_coef*(P_row - D) + (P_col - D)*col_coef;
        None for a side not needed (the texts' side is computed when neither is)."""
        b, n_cols = image.shape[0], texts.shape[0]
        txt = texts.float()
        s = scale.float().reshape(())
        d_image, d_texts = self._grad_buffers(b, txt, need_image, need_texts)
        logits, work = self._buffers(b, n_cols, image.device)
        for start in range(0, b, self.chunk_rows):
            img = image[start:start + self.chunk_rows].float()
            n = img.shape[0]
            chunk, p_row = logits[:n], work[:n]
            torch.mm(img * s, txt.T, out=chunk)
            torch.sub(chunk, row_lse[start:start + n, None], out=p_row).exp_()
            grad = chunk.sub_(col_lse).exp_().mul_(col_coef).addcmul_(p_row, row_coef)
            first = offset + start  # this chunk's positive pairs: (r, first + r)
            grad.diagonal(first).sub_(col_coef[first:first + n] + row_coef)
            self._add_grads(grad, img, txt, start, d_image, d_texts)
        return d_image, d_texts

    def siglip_row_loss(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor, offset: int) -> torch.Tensor:
        """Per image row: sum over all texts of softplus(-z * (scale * i.t + bias)), z = +1 on pairs."""
        b, n_cols = image.shape[0], texts.shape[0]
        txt = texts.float()
        s = scale.float().reshape(())
        row_loss = torch.empty(b, dtype=torch.float32, device=image.device)
        (logits,) = self._buffers(b, n_cols, image.device, count=1)
        for start in range(0, b, self.chunk_rows):
            img = image[start:start + self.chunk_rows].float() * s
            n = img.shape[0]
            chunk = self._signed_logits(logits[:n], img, txt, bias, offset + start)
            row_loss[start:start + n] = F.softplus(chunk).sum(1)
        return row_loss

    def siglip_grads(self, image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, coef: torch.Tensor, offset: int, need_image: bool = True,
                     need_texts: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """Raw gradients (dS @ T, dS.T @ I, sum dS) for dS = -z * sigmoid(-z * logits) * coef;
        None for a side not needed, as in clip_grads."""
        b, n_cols = image.shape[0], texts.shape[0]
        txt = texts.float()
        s = scale.float().reshape(())
        d_image, d_texts = self._grad_buffers(b, txt, need_image, need_texts)
        d_bias = torch.zeros((), dtype=torch.float32, device=image.device)
        (logits,) = self._buffers(b, n_cols, image.device, count=1)
        for start in range(0, b, self.chunk_rows):
            img = image[start:start + self.chunk_rows].float()
            n = img.shape[0]
            grad = self._signed_logits(logits[:n], img * s, txt, bias, offset + start).sigmoid_()
            self._negate_pairs(grad, offset + start).mul_(coef)
            d_bias += grad.sum()
            self._add_grads(grad, img, txt, start, d_image, d_texts)
        return d_image, d_texts, d_bias

    @staticmethod
    def _grad_buffers(b: int, txt: torch.Tensor, need_image: bool,
                      need_texts: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        d_image = torch.empty(b, txt.shape[1], dtype=torch.float32, device=txt.device) if need_image else None
        d_texts = torch.zeros_like(txt) if need_texts or not need_image else None
        return d_image, d_texts

    @staticmethod
    def _add_grads(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, start: int,
                   d_image: Optional[torch.Tensor], d_texts: Optional[torch.Tensor]) -> None:
        """One chunk's share: its rows of dS @ T, and dS.T @ I added to the texts' gradient."""
        if d_image is not None:
            torch.mm(grad, txt, out=d_image[start:start + grad.shape[0]])
        if d_texts is not None:
            d_texts.addmm_(grad.T, img)

    def _buffers(self, b: int, n_cols: int, device: torch.device,
                 count: int = 2) -> list[torch.Tensor]:
        rows = min(self.chunk_rows, b)
        return [torch.empty(rows, n_cols, dtype=torch.float32, device=device) for _ in range(count)]

    def _signed_logits(self, out: torch.Tensor, scaled_img: torch.Tensor, txt: torch.Tensor,
                       bias: torch.Tensor, first_col: int) -> torch.Tensor:
        """-z * (logits + bias) in `out`: z = +1 for the pair (row r, column first_col + r), else -1."""
        torch.mm(scaled_img, txt.T, out=out)
        out.add_(bias.float())
        return self._negate_pairs(out, first_col)

    @staticmethod
    def _negate_pairs(x: torch.Tensor, first_col: int) -> torch.Tensor:
        """x * -z in place: negates the positive pairs (row r, column first_col + r)."""
        rows = torch.arange(x.shape[0], device=x.device)
        x[rows, rows + first_col] *= -1
        return x
