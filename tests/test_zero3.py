"""dsclip's ZeRO-3 additions (fetch units, shared fp32 master, coalesced persistent gather) on 2 CPU
ranks: the same training as plain data parallelism, with the additions actually engaged."""
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsclip.training import memory, zero3
from dsclip_testutils import run_on_ranks

WORLD = 2
STEPS = 3
CLIP = 1.0  # binding: the first gradients' norm is ~100
TINY = {  # matrices are partitioned; biases, LayerNorms and the logit scale stay whole (persistent)
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 1000, (4, 8), generator=g)


def _loss(model, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image_features, text_features, scale = model(images, texts)
    logits = scale * image_features @ text_features.T
    return F.cross_entropy(logits, torch.arange(len(logits)))


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps well above rounding noise: Adam would otherwise turn the noise in gradients that are
    # zero in exact arithmetic (attention key biases) into full-size steps that differ by run
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)


def _data_parallel(rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: whole model on each rank, gradients averaged with gloo."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY, nonscalar_logit_scale=True)
    optimizer = _optimizer(model)
    losses = []
    for step in range(STEPS):
        loss = _loss(model, *_batch(rank, step))
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero3(rank: int) -> dict:
    import deepspeed
    from deepspeed.utils import z3_leaf_module

    from dsclip.loss import collectives
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY, nonscalar_logit_scale=True)  # ZeRO-3 cannot partition a 0-d tensor
    blocks = zero3.mark_fetch_units(model, model)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100,
                                    "memory_efficient_linear": False}}  # as ds_configs/zero3.json
    engine, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(model), config=config)
    shared = zero3.share_fp32_master(engine.optimizer)
    zero3.coalesce_persistent_gather(engine.optimizer)
    fused = zero3.fuse_grad_norm(engine.optimizer)
    norms = []  # (fused, DeepSpeed's per-parameter) gradient norm of each step
    opt = engine.optimizer
    fused_norms = opt._get_norm_groups

    def both_norms():
        got = fused_norms()
        per_parameter = [type(opt).get_grad_norm_direct(opt, opt.averaged_gradients[i], params)
                         for i, params in enumerate(opt.fp16_groups)]
        norms.append((torch.stack(got).tolist(), torch.stack(per_parameter).tolist()))
        return got

    opt._get_norm_groups = both_norms
    sums = []
    # every shared-memory collective passes the exchange's arrival barrier once per round
    collectives.SharedExchange.arrive = lambda self, kind, real=collectives.SharedExchange.arrive: (sums.append(1),
                                                                                                 real(self, kind))
    losses, step_collectives = [], []
    for step in range(STEPS):
        loss = _loss(engine, *_batch(rank, step))
        engine.backward(loss)
        before = len(sums)
        engine.step()
        step_collectives.append(len(sums) - before)
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    partition_bytes = sum(t.numel() * t.element_size() for t in opt.fp16_partitioned_groups_flat)
    return {"losses": losses, "params": params, "blocks": blocks, "shared": shared, "fused": fused, "norms": norms,
            "leaves": sum(z3_leaf_module(m) for m in model.modules()),
            "persistent": len(opt.persistent_parameters), "step_collectives": step_collectives,
            "aliased": all(a.data_ptr() == b.data_ptr() for a, b in zip(opt.fp16_partitioned_groups_flat,
                                                                          opt.fp32_partitioned_groups_flat)),
            "optimizer_bytes": memory.state_bytes(engine)["optimizer"], "partition_bytes": partition_bytes}


def _run(rank: int) -> dict:
    reference_losses, reference_params = _data_parallel(rank)
    result = _zero3(rank)
    params = result.pop("params")
    result["reference_losses"] = reference_losses
    result["max_param_diff"] = max((params[n] - p).abs().max().item() for n, p in reference_params.items())
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_run, WORLD, tmp_path_factory.mktemp("zero3"))


def test_every_block_of_both_towers_is_a_fetch_unit_when_training_everything():
    model = open_clip.CLIP(**TINY)
    assert zero3.fetch_unit_names(model) == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                                             "transformer.resblocks.0"]


def test_a_trainable_block_above_frozen_layers_keeps_per_submodule_hooks():
    model = open_clip.CLIP(**TINY)
    model.lock_image_tower(unlocked_groups=2)  # embeddings + block 0 frozen; block 1, ln_post, proj train
    model.lock_text_tower(unlocked_layers=0)  # the whole text tower frozen
    # block 1 trains on an input without gradient: DeepSpeed's unit hook would fire too early
    assert zero3.fetch_unit_names(model) == ["visual.transformer.resblocks.0", "transformer.resblocks.0"]


@pytest.mark.multiprocess
def test_zero3_with_dsclip_additions_trains_like_data_parallel(results):
    for r in results:
        assert r["losses"] == pytest.approx(r["reference_losses"], rel=1e-5)
        assert r["max_param_diff"] < 1e-4


@pytest.mark.multiprocess
def test_each_block_is_one_fetch_unit(results):
    assert all(r["blocks"] == 3 and r["leaves"] == 3 for r in results)


@pytest.mark.multiprocess
def test_fp32_master_is_the_parameter_partition(results):
    for r in results:
        assert r["shared"] >= 1 and r["aliased"]
        # only AdamW's two moments (+ per-group step counters) remain beside the partition
        assert r["optimizer_bytes"] == pytest.approx(2 * r["partition_bytes"], rel=0.01)


@pytest.mark.multiprocess
def test_gradient_norm_in_one_reduction_equals_deepspeeds_per_parameter_norm(results):
    for r in results:
        assert r["fused"] and len(r["norms"]) == STEPS
        for fused, per_parameter in r["norms"]:
            assert fused == pytest.approx(per_parameter, rel=1e-6)
            assert all(n > CLIP for n in fused)  # clipping binds, so the norm shapes the steps compared above


@pytest.mark.multiprocess
def test_persistent_parameters_are_gathered_in_one_collective(results):
    for r in results:
        assert r["persistent"] > 10
        # the gather, plus the gradient-norm and overflow reductions: not one per parameter
        assert max(r["step_collectives"]) <= 4


def test_contiguous_span_covers_back_to_back_slices_only():
    flat = torch.arange(10.0)
    parts = [flat[0:3], flat[3:4], flat[4:9]]
    span = zero3.contiguous_span(parts)
    assert span.data_ptr() == flat.data_ptr() and span.tolist() == list(range(9))
    assert zero3.contiguous_span([flat[0:3], flat[4:9]]) is None  # a gap
    assert zero3.contiguous_span([flat[3:4], flat[0:3]]) is None  # out of order
    assert zero3.contiguous_span([flat[0:3], torch.arange(3.0)]) is None  # another buffer
    assert zero3.contiguous_span([flat.view(2, 5)[:, :2]]) is None  # not contiguous
