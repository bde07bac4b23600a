import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dsclip.eval.forgetting import forgetting_table
from dsclip.eval.metrics import retrieval_metrics, topk_correct, zeroshot_classifier_weights
from dsclip.data.templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, check_templates, load_class_prompts


def brute_force_ranks(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """1-based rank of key i for query i, from a full argsort (no ties in random data)."""
    order = (query @ keys.T).argsort(dim=1, descending=True)
    return (order == torch.arange(len(query))[:, None]).float().argmax(dim=1) + 1


def paired_features(n: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, d, generator=gen)
    texts = images + noise * torch.randn(n, d, generator=gen)
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 500])
def test_retrieval_metrics_match_brute_force(chunk_size):
    images, texts = paired_features(203, 16, noise=1.5)
    metrics = retrieval_metrics(images, texts, chunk_size=chunk_size)
    for prefix, ranks in [("image_to_text", brute_force_ranks(images, texts)),
                          ("text_to_image", brute_force_ranks(texts, images))]:
        for k in (1, 5, 10):
            assert metrics[f"{prefix}_R@{k}"] == pytest.approx(100.0 * (ranks <= k).float().mean().item())
        assert metrics[f"{prefix}_mean_rank"] == pytest.approx(ranks.double().mean().item())
        assert metrics[f"{prefix}_median_rank"] == ranks.median().item()  # odd N: one middle
    # The two directions differ on noisy data: a swapped direction would be caught.
    assert metrics["image_to_text_mean_rank"] != metrics["text_to_image_mean_rank"]


def test_median_rank_averages_the_two_middle_ranks():
    # Two pairs where image 0 prefers text 1: ranks image->text are [2, 1] -> median 1.5.
    images = F.normalize(torch.tensor([[0.3, 1.0], [0.0, 1.0]]), dim=-1)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_metrics(images, texts)
    assert metrics["image_to_text_median_rank"] == pytest.approx(1.5)
    assert metrics["image_to_text_R@1"] == pytest.approx(50.0)


def test_identical_features_get_the_worst_rank_not_the_best():
    features = F.normalize(torch.ones(50, 8), dim=-1)
    metrics = retrieval_metrics(features, features, chunk_size=16)
    assert metrics["image_to_text_R@1"] == 0.0
    assert metrics["text_to_image_mean_rank"] == 50.0


def test_perfect_pairs_rank_first():
    images, texts = paired_features(300, 32, noise=0.0)
    metrics = retrieval_metrics(images, texts, chunk_size=32)
    assert metrics["image_to_text_R@1"] == 100.0 and metrics["text_to_image_median_rank"] == 1.0


def test_bf16_features_are_accepted():
    images, texts = paired_features(64, 16, noise=0.5)
    exact = retrieval_metrics(images, texts)
    low = retrieval_metrics(images.bfloat16(), texts.bfloat16())
    assert low["image_to_text_R@10"] == pytest.approx(exact["image_to_text_R@10"], abs=5.0)


@pytest.mark.parametrize("images,texts,message", [
    (torch.randn(4, 8), torch.randn(4, 8), "L2-normalised"),
    (F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1), "one text per image"),
    (torch.zeros(0, 8), torch.zeros(0, 8), "at least one pair"),
])
def test_retrieval_metrics_rejects_bad_input(images, texts, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, texts)


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from dsclip.eval.metrics import retrieval_metrics

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n, d, chunk = (int(a) for a in sys.argv[1:4])
    torch.manual_seed(0)
    start = peak_mib()
    # Built in place so that building the inputs does not raise the peak by itself.
    images = torch.randn(n, d)
    images.div_(images.norm(dim=1, keepdim=True))
    texts = torch.randn(n, d).add_(images)
    texts.div_(texts.norm(dim=1, keepdim=True))
    with_inputs = peak_mib()
    retrieval_metrics(images, texts, chunk_size=chunk)
    end = peak_mib()
    print(json.dumps({"torch_mib": start, "inputs_mib": with_inputs - start,
                      "metric_mib": end - with_inputs, "process_peak_mib": end}))
""")


def measure_memory(n: int, d: int, chunk: int) -> dict[str, float]:
    """Peak RSS of a fresh process: torch alone, + the features, + the metric's own working set."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n), str(d), str(chunk)],
                         check=True, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "2", "PYTHONPATH": "."})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess  # spawns processes; kept out of the quick tier
def test_retrieval_memory_is_linear_not_quadratic():
    # A 20k x 20k score matrix would take 1.6 GB; the chunked pass needs ~chunk * N floats.
    result = measure_memory(20_000, 64, 256)
    assert result["metric_mib"] < 400, result


@pytest.mark.slow
def test_retrieval_100k_pairs_stays_under_1gb():
    # Features (2 x 100k x 512 fp32 = 391 MiB) plus the metric's working set, torch excluded.
    result = measure_memory(100_000, 512, 256)
    assert result["inputs_mib"] + result["metric_mib"] < 1024, result


def test_zeroshot_classifier_weights_average_normalised_prompts():
    features = torch.tensor([[[3.0, 0.0], [0.0, 1.0]],  # class 0: two templates, different norms
                             [[0.0, 2.0], [0.0, 5.0]]])
    weights = zeroshot_classifier_weights(features)
    assert weights.shape == (2, 2)
    expected0 = torch.tensor([1.0, 1.0]) / 2 ** 0.5  # norms ignored: mean of unit vectors
    torch.testing.assert_close(weights[:, 0], expected0)
    torch.testing.assert_close(weights[:, 1], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="n_templates"):
        zeroshot_classifier_weights(torch.randn(3, 4))


def test_topk_correct_counts_hits():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2])
    # row 0 top1 hit; row 1 label ranked 2nd; row 2 label ranked 3rd
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    with pytest.raises(ValueError, match="labels"):
        topk_correct(logits, labels[:2])


def test_forgetting_table_warns_on_general_drops_only():
    before = {"zs/imagenet_top1": 60.0, "zs/cars_top1": 30.0, "retrieval/R@1": 40.0}
    after = {"zs/imagenet_top1": 55.5, "zs/cars_top1": 70.0, "retrieval/R@1": 20.0, "new/metric": 1.0}
    table, warnings = forgetting_table(before, after, general=["zs/imagenet_top1"], max_drop_points=3.0)
    assert "| zs/imagenet_top1 (general) | 60.00 | 55.50 | -4.50 |" in table
    assert "| zs/cars_top1 | 30.00 | 70.00 | +40.00 |" in table
    assert "| new/metric |  | 1.00 |  |" in table
    assert len(warnings) == 1 and "zs/imagenet_top1 dropped 4.50 points" in warnings[0]
    _, none = forgetting_table(before, after, general=["zs/imagenet_top1"], max_drop_points=5.0)
    assert none == []
    with pytest.raises(ValueError, match="new/metric"):
        forgetting_table(before, after, general=["new/metric"], max_drop_points=1.0)


def test_template_sets_have_one_slot_each():
    assert 20 <= len(IMAGENET_TEMPLATES) <= 80 and len(set(IMAGENET_TEMPLATES)) == len(IMAGENET_TEMPLATES)
    check_templates(IMAGENET_TEMPLATES, "imagenet")
    check_templates(SIMPLE_TEMPLATES, "simple")


def test_load_class_prompts_builds_prompts(tmp_path):
    path = tmp_path / "fashion.yaml"
    path.write_text("classes: [t-shirt, trouser, '7']\ntemplates: ['a photo of a {}.', '{} on a model']\n")
    prompts = load_class_prompts(path)
    assert prompts.classes == ["t-shirt", "trouser", "7"]
    assert prompts.prompts()[1] == ["a photo of a trouser.", "trouser on a model"]
    path.write_text("classes: [cat, dog]\ntemplates: imagenet\n")
    assert load_class_prompts(path).templates == IMAGENET_TEMPLATES
    path.write_text("classes: [cat, dog]\n")
    assert load_class_prompts(path).templates == SIMPLE_TEMPLATES


@pytest.mark.parametrize("text,message", [
    ("classes: [cat]\ntemplates: ['a photo of a cat.']\n", "exactly one '{}'"),
    ("classes: [cat]\ntemplates: ['{} and {}']\n", "exactly one '{}'"),
    ("classes: [cat, 7, no]\n", "quote names"),
    ("classes: [cat, cat]\n", "duplicate class names"),
    ("classes: [cat]\ntemplate: simple\n", "unknown keys \\['template'\\]"),
    ("classes: [cat]\ntemplates: fancy\n", "unknown template set 'fancy'"),
    ("- cat\n- dog\n", "expected a mapping"),
])
def test_load_class_prompts_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_class_prompts(path)


def test_load_class_prompts_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="missing.yaml does not exist"):
        load_class_prompts(tmp_path / "missing.yaml")
