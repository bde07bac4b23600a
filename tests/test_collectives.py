"""Shared-memory collectives (2 CPU ranks): same results as gloo, fallback where they cannot run."""
import pytest
import torch
import torch.distributed as dist

from dsclip_testutils import run_on_ranks

WORLD = 2


def _compare(rank: int) -> dict:
    from deepspeed import comm

    from dsclip.collectives import SharedMemoryCollectives
    backend = comm.comm.cdb
    generator = torch.Generator().manual_seed(rank)
    n = 2_500_003  # odd, and larger than one chunk of the shared-memory kernel
    results = {"routed": isinstance(backend, SharedMemoryCollectives),
               "dtypes": sorted(str(d) for d in getattr(backend, "dtypes", ()))}

    x = torch.randn(n, generator=generator)
    shared, gloo = x.clone(), x.clone()
    comm.all_reduce(shared)
    dist.all_reduce(gloo)
    results["all_reduce"] = torch.equal(shared, gloo)

    biggest, gloo_max = x.clone(), x.clone()
    comm.all_reduce(biggest, op=comm.ReduceOp.MAX)  # not a sum: must fall back to gloo
    dist.all_reduce(gloo_max, op=dist.ReduceOp.MAX)
    results["all_reduce_max"] = torch.equal(biggest, gloo_max)

    full = torch.randn(2 * 1_000_001, generator=generator)
    expected = torch.empty(1_000_001)
    dist.reduce_scatter_tensor(expected, full.clone())
    separate = torch.empty(1_000_001)
    source = full.clone()
    comm.reduce_scatter_fn(separate, source, async_op=True).wait()
    results["reduce_scatter"] = torch.equal(separate, expected)
    results["reduce_scatter_keeps_input"] = torch.equal(source, full)
    aliased = full.clone()
    mine = aliased.narrow(0, rank * 1_000_001, 1_000_001)
    comm.reduce_scatter_fn(mine, aliased)
    results["reduce_scatter_in_place"] = torch.equal(mine, expected)

    shard = torch.randn(777_777, generator=generator)
    gathered, gloo_gathered = torch.full((WORLD * 777_777,), float("nan")), torch.empty(WORLD * 777_777)
    comm.allgather_fn(gathered, shard, async_op=True).wait()
    dist.all_gather_into_tensor(gloo_gathered, shard)
    results["all_gather"] = torch.equal(gathered, gloo_gathered)

    if torch.bfloat16 in getattr(backend, "dtypes", ()):
        half, gloo_half = x.bfloat16(), x.bfloat16()
        comm.all_reduce(half)
        dist.all_reduce(gloo_half)
        results["all_reduce_bf16"] = torch.equal(half, gloo_half)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_compare, WORLD, tmp_path_factory.mktemp("collectives"))


def test_ranks_on_one_host_route_through_shared_memory(results):
    assert all(r["routed"] and "torch.float32" in r["dtypes"] for r in results)


@pytest.mark.parametrize("op", ["all_reduce", "all_reduce_max", "reduce_scatter", "reduce_scatter_keeps_input",
                                "reduce_scatter_in_place", "all_gather"])
def test_results_equal_gloo_bit_for_bit(results, op):
    assert all(r[op] for r in results)


def test_bf16_sums_equal_gloo_where_the_kernel_supports_it(results):
    if "all_reduce_bf16" not in results[0]:
        pytest.skip("this CPU lacks AVX-512BW: bf16 stays on gloo")
    assert all(r["all_reduce_bf16"] for r in results)
