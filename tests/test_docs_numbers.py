"""The docs' measured numbers: every generated block renders from bench/results/*.json as it stands
(bench/doc_tables.py), and no measured quantity appears outside a generated block unless ALLOWED says
why it is not a measurement or what backs it."""
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", REPO / "bench" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doc_tables = _doc_tables()

# Files whose prose is scanned for measured quantities outside generated blocks.
SCANNED = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

MEASURED = [
    re.compile(r"\d[\d.,]*\s?(?:samples/s|images/s|minutes|seconds|min|ms|s|GiB|MiB|GB|MB|KB)\b"),
    re.compile(r"\d+(?:\.\d+)?x\b"),  # ratios
    re.compile(r"\d+(?:\.\d+)?%"),
]

# (file relative to the repository, exact substring of the line, why it is not a measurement or what backs it)
ALLOWED = [
    ("README.md", "24 GB+ cards", "a GPU memory size, not a measurement"),
    ("docs/architecture.md", "a 64 MB /dev/shm file", "EXCHANGE_BYTES in dsclip/loss/collectives.py"),
    ("docs/architecture.md", "allocations up to 1 GB", "the mallopt threshold keep_freed_host_memory sets"),
    ("docs/checkpoints.md", "30 s after the signal", "the DeepSpeed launcher's fixed wait before it kills ranks"),
    ("docs/data.md", "Sets above 1 GiB", "CACHE_BYTES in dsclip/data/synthetic.py"),
    ("docs/evaluation.md", "stay under 1 GiB", "tests/test_retrieval.py::test_retrieval_100k_pairs_stays_under_1gb"),
    ("docs/recipes.md", "24 GB+ cards", "a GPU memory size, not a measurement"),
    ("docs/recipes.md", "~1.5x zero2's traffic", "counted from the algorithm: 3 parameter passes per step vs 2"),
    ("docs/recipes.md", "needs 6.8 GB", "computed: 16 bytes x parameter count, GB = 1e9"),
    ("docs/recipes.md", "needs 40 GB", "computed: 16 bytes x parameter count, GB = 1e9"),
    ("docs/recipes.md", "5 GB per GPU", "computed: 16 bytes x parameter count / 8, GB = 1e9"),
    ("README.md", "`train.collective_timeout_s` (600 s)", "the recipe key's default"),
    ("docs/multinode.md", "`train.collective_timeout_s` (600 s)", "the recipe key's default"),
    ("README.md", "waits of 1, 2, 4 s", "RETRY_BASE_S in dsclip/data/shards.py, doubled per retry"),
    ("README.md", "about 30 s from the signal", "the DeepSpeed launcher's and torchrun's fixed wait before SIGKILL"),
    ("docs/checkpoints.md", "ranks 30 s after the signal", "torchrun's fixed wait before it kills ranks"),
    ("docs/checkpoints.md", "size, +20%", "SPACE_MARGIN in dsclip/training/checkpoint.py"),
    ("docs/checkpoints.md", "job step 120 s before", "launch/slurm.sbatch's --signal=TERM@120"),
]


def _allowed(rel: str, line: str, match: re.Match) -> bool:
    for file, text, _why in ALLOWED:
        if file != rel:
            continue
        at = line.find(text)
        while at >= 0:
            if at <= match.start() and match.end() <= at + len(text):
                return True
            at = line.find(text, at + 1)
    return False


def _hits() -> tuple[list[str], set[tuple[str, str]]]:
    hits, used = [], set()
    for path in SCANNED:
        rel = str(path.relative_to(REPO))
        for number, line in doc_tables.outside_blocks(path.read_text()):
            for pattern in MEASURED:
                for match in pattern.finditer(line):
                    if _allowed(rel, line, match):
                        used.update((f, t) for f, t, _ in ALLOWED if f == rel and t in line)
                    else:
                        hits.append(f"{rel}:{number}: {match.group(0)!r} in: {line.strip()}")
    return hits, used


def test_generated_blocks_match_their_json():
    problems = doc_tables.check(REPO)
    assert not problems, (
        "docs drifted from bench/results/*.json (fix: python bench/doc_tables.py):\n" + "\n".join(problems))


def test_no_measured_number_outside_generated_blocks():
    hits, _ = _hits()
    assert not hits, (
        "measured quantities outside generated blocks: render them with a block in bench/doc_tables.py "
        "from a bench/results/*.json (then python bench/doc_tables.py), remove them, or add them to ALLOWED "
        "in tests/test_docs_numbers.py with the reason:\n" + "\n".join(hits))


def test_allowlist_entries_are_used():
    _, used = _hits()
    stale = [(f, t) for f, t, _ in ALLOWED if (f, t) not in used and (REPO / f) in SCANNED]
    assert not stale, f"ALLOWED entries that match nothing any more (remove them): {stale}"


def test_check_reports_drift_unknown_and_missing_blocks(tmp_path):
    (tmp_path / "docs").mkdir()
    start, end = doc_tables.marker_lines("data_ratio")
    (tmp_path / "README.md").write_text(f"{start}\nstale\n{end}\n<!-- generated:nope (python bench/doc_tables.py) -->\n"
                                        "<!-- /generated:nope -->\n```\n" + start + "\n```\n")
    problems = "\n".join(doc_tables.check(tmp_path))
    assert "README.md:1: block 'data_ratio' differs" in problems
    assert "unknown block 'nope'" in problems
    assert "block 'loss_table' is in no file" in problems
    assert "block 'data_ratio' is in no file" not in problems
    doc_tables.check(tmp_path, write=True)
    assert doc_tables.data_ratio() in (tmp_path / "README.md").read_text()
    assert "README.md:1:" not in "\n".join(doc_tables.check(tmp_path))
