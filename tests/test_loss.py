"""Parity of dsclip's tiled losses with open_clip's ClipLoss / SigLipLoss, on 1 and 2 ranks.

Reference semantics: ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss, each
rank backpropagating its own loss (here with a different grad_output per rank), feature
gradients compared per rank and logit scale / bias gradients after data-parallel averaging.
"""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from dsclip.loss.config import LossConfig
from dsclip.loss.contrastive import TiledContrastiveLoss, build_loss
from dsclip.training.bootstrap import free_port
from dsclip_kernels.contrastive import INTERPRET
from test_kernels import _case, gpu, needs_cuda

TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32 acceptance
NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


def _inputs(b: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor([11.3], requires_grad=True)  # exp(logit_scale), nonscalar like open_clip's
    bias = torch.tensor([-4.2], requires_grad=True)
    return image, text, scale, bias


def _loss_and_grads(loss_fn, inputs, grad_output: float) -> list[torch.Tensor]:
    image, text, scale, bias = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(image, text, scale, bias)
    (loss * grad_output).backward()
    zero = torch.zeros_like(bias)
    return [loss.detach(), image.grad, text.grad, scale.grad, zero if bias.grad is None else bias.grad]


def _open_clip_loss(kind: str, rank: int = 0, world: int = 1):
    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return SigLipLoss(rank=rank, world_size=world)


def _max_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    return {name: (g.float() - w.float()).abs().max().item() for name, g, w in zip(NAMES, got, want)}


def _assert_parity(got: list[torch.Tensor], want: list[torch.Tensor], tol: dict) -> None:
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


# (kind, impl, b, d, chunk_rows): odd shapes, one row, B not a multiple of the chunk, d 32..1024
SINGLE_RANK_CASES = [
    ("clip", "torch_tiled", 1, 32, 16),
    ("clip", "torch_tiled", 37, 77, 16),
    ("clip", "torch_tiled", 300, 1024, 64),
    ("siglip", "torch_tiled", 1, 32, 16),
    ("siglip", "torch_tiled", 37, 77, 16),
    ("siglip", "torch_tiled", 300, 1024, 64),
    ("clip", "reference", 37, 77, 0),
    ("siglip", "reference", 37, 77, 0),
]
# CPU tensors reach the Triton kernels only through the interpreter; on CUDA machines
# tests/test_kernels.py's gpu table compares the compiled kernels with open_clip instead.
if INTERPRET:
    SINGLE_RANK_CASES += [("clip", "triton", 1, 32, 0), ("clip", "triton", 37, 45, 0), ("siglip", "triton", 37, 45, 0)]


@pytest.mark.parametrize("kind,impl,b,d,chunk", SINGLE_RANK_CASES)
def test_single_rank_matches_open_clip(kind, impl, b, d, chunk):
    inputs = _inputs(b, d, seed=b + d)
    loss_fn = build_loss(LossConfig(kind=kind, impl=impl, chunk_rows=max(chunk, 1)))
    got = _loss_and_grads(loss_fn, inputs, grad_output=1.7)
    want = _loss_and_grads(_open_clip_loss(kind), inputs, grad_output=1.7)
    _assert_parity(got, want, TOL)


def test_clip_loss_ignores_logit_bias_like_softmax_does():
    inputs = _inputs(9, 32, seed=1)
    loss_fn = build_loss(LossConfig(impl="torch_tiled"))
    with_bias = _loss_and_grads(loss_fn, inputs, 1.0)
    without = _loss_and_grads(lambda i, t, s, b: loss_fn(i, t, s), inputs, 1.0)
    _assert_parity(with_bias[:4], without[:4], TOL)


def test_auto_uses_the_pytorch_twin_on_cpu():
    loss_fn = build_loss(LossConfig(impl="auto", chunk_rows=7))
    assert loss_fn._ops(torch.zeros(2, 2)) is loss_fn.twin


@pytest.mark.parametrize("field,value", [("chunk_rows", 0), ("impl", "flash"), ("kind", "triplet")])
def test_bad_config_is_a_value_error_naming_the_field(field, value):
    cfg = LossConfig(**{field: value})
    with pytest.raises(ValueError, match=f"loss.{field}"):
        build_loss(cfg)


# 2 ranks: (kind, impl, b, d, chunk_rows); triton cases stay tiny for the interpreter
TWO_RANK_CASES = [
    ("clip", "torch_tiled", 1, 32, 16),
    ("clip", "torch_tiled", 19, 77, 8),
    ("clip", "torch_tiled", 150, 1024, 64),
    ("siglip", "torch_tiled", 1, 32, 16),
    ("siglip", "torch_tiled", 19, 77, 8),
    ("siglip", "torch_tiled", 150, 1024, 64),
]
if INTERPRET:
    TWO_RANK_CASES += [("clip", "triton", 19, 45, 0), ("siglip", "triton", 19, 45, 0)]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for case in TWO_RANK_CASES:
        kind, impl, b, d, chunk = case
        inputs = _inputs(b, d, seed=100 * rank + d)
        grad_output = 0.7 + 0.6 * rank  # ranks backpropagate different loss weights
        loss_fn = build_loss(LossConfig(kind=kind, impl=impl, chunk_rows=max(chunk, 1)))
        got = _loss_and_grads(loss_fn, inputs, grad_output)
        want = _loss_and_grads(_open_clip_loss(kind, rank, world), inputs, grad_output)
        for grads in (got, want):  # replicated parameters: DeepSpeed averages their gradients
            for g in grads[3:]:
                dist.all_reduce(g)
                g /= world
        results[repr(case)] = _max_errors(got, want)
    try:
        TiledContrastiveLoss("clip", "torch_tiled", 8)(*_inputs(3 + rank, 32, seed=0)[:3])
        results["unequal"] = "no error"
    except ValueError as err:
        results["unequal"] = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_errors(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("two_ranks"))
    mp.spawn(_rank_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=[f"{c[0]}-{c[1]}-b{c[2]}-d{c[3]}" for c in TWO_RANK_CASES])
def test_two_ranks_match_open_clip_after_averaging(two_rank_errors, case):
    for rank, errors in enumerate(two_rank_errors):
        worst = errors[repr(case)]
        assert all(err <= TOL["atol"] for err in worst.values()), f"rank {rank} max abs errors: {worst}"


@pytest.mark.multiprocess
def test_unequal_local_batches_are_a_clear_error(two_rank_errors):
    for errors in two_rank_errors:
        assert "batches of different sizes" in errors["unequal"] and "[3, 4]" in errors["unequal"]



@pytest.mark.parametrize("clustered", [True, False])
def test_large_logit_scale_matches_open_clip(clustered):
    # s = 100, open_clip's clamp. Clustered: images near u, every other text near -u, so a
    # chunk's logits spread past the twin's one-exp GEMV limit and its per-column fallback
    # runs; random 512-d features stay inside the limit.
    image, text, _, bias = _inputs(70, 512, seed=3)
    if clustered:
        u = F.normalize(torch.randn(512, generator=torch.Generator().manual_seed(4)), dim=0)
        signs = torch.tensor([1.0, -1.0]).repeat(35)[:, None]
        image = F.normalize(u + 0.3 * image.detach(), dim=-1).requires_grad_()
        text = F.normalize(signs * u + 0.3 * text.detach(), dim=-1).requires_grad_()
    scale = torch.tensor([100.0], requires_grad=True)
    logits = 100.0 * image.detach()[:32] @ text.detach().T
    spread = (logits.logsumexp(1).max() - logits.amax(0).min()).item()
    assert (spread > 70) == clustered, spread
    loss_fn = build_loss(LossConfig(impl="torch_tiled", chunk_rows=32))
    got = _loss_and_grads(loss_fn, (image, text, scale, bias), grad_output=0.9)
    want = _loss_and_grads(_open_clip_loss("clip"), (image, text, scale, bias), grad_output=0.9)
    _assert_parity(got, want, TOL)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("b,d", [(1, 32), (777, 512), (2000, 1024)])
def test_cuda_loss_matches_open_clip(kind, b, d):
    from open_clip.loss import ClipLoss, SigLipLoss

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


class _RecordingOps:
    """Wraps a primitives object, recording the dtype of the features each call receives."""

    def __init__(self, ops):
        self.ops, self.dtypes = ops, []

    def __getattr__(self, name):
        def call(image, texts, *rest, **kwargs):
            self.dtypes.append((name, image.dtype, texts.dtype))
            return getattr(self.ops, name)(image, texts, *rest, **kwargs)
        return call


@pytest.mark.parametrize("impl", ["triton", "torch_tiled"])
def test_low_precision_features_reach_the_kernels_as_they_are_and_the_twin_in_fp32(impl, monkeypatch):
    loss_fn = build_loss(LossConfig(impl=impl, chunk_rows=16))
    recorder = _RecordingOps(loss_fn._ops(torch.zeros(1)))
    monkeypatch.setattr(loss_fn, "_ops", lambda features: recorder)
    image, text, scale, _ = _inputs(24, 32, seed=3)
    low = [x.detach().to(torch.bfloat16).requires_grad_() for x in (image, text)]
    loss = loss_fn(*low, scale)
    loss.backward()
    want = torch.bfloat16 if impl == "triton" else torch.float32
    assert {(dtype, text_dtype) for _, dtype, text_dtype in recorder.dtypes} == {(want, want)}
    assert [name for name, *_ in recorder.dtypes] == ["clip_stats", "clip_grads"]
    assert low[0].grad.dtype == torch.bfloat16 and low[1].grad.dtype == torch.bfloat16
    # the same features upcast by hand give the same loss through the twin (bf16 -> fp32 is exact)
    reference = build_loss(LossConfig(impl="torch_tiled", chunk_rows=16))(*(x.detach().float() for x in low), scale)
    torch.testing.assert_close(loss.detach(), reference.detach(), atol=2e-2 if impl == "triton" else 0, rtol=0)
