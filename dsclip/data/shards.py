"""WebDataset input: shard lists, weighted source mixing, rank/worker splitting, bad-sample skipping, data position.

Equal steps on every rank (collectives would hang otherwise):
- resampled: steps_per_epoch = train_num_samples // (world_size * batch_size); every worker draws shards with
  replacement forever and the loader stops each rank after exactly that many batches.
- non-resampled: the shard list (all sources, seed-permuted once, so the assignment is the same every epoch) is dealt
  round-robin to ranks, then to the workers of each rank. Each worker batches its own samples and drops its ragged
  tail, so a rank holds sum_w floor(samples_w / batch_size) batches, computed from the shards' manifest.json
  (per-shard counts) or, without one, from train_num_samples spread evenly over the shards. steps_per_epoch is the
  minimum over ranks; ranks with more batches stop there. A rank that comes up short (skipped bad samples, an
  optimistic estimate) starts a second pass over its shards for the missing batches, with a warning.
  With balanced shards each sample is seen exactly once per epoch.

Data position (exact resume): per worker, how many raw samples it had consumed when its last delivered batch was
made. A resumed worker re-reads its shards up to there without decoding and the worker order is rotated so that the
next batch is the one the interrupted run would have produced. Exact in resampled mode and, in non-resampled mode,
until the first worker of the rank runs out of shards; after that the rest of the epoch is the same set of batches,
possibly in another order.
"""
import gzip
import io
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import webdataset as wds
from webdataset.gopen import gopen
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsclip.credentials import redact
from dsclip.data.config import WebDataConfig
from dsclip.data.decode import ImageDecoder, seeded
from dsclip.errors import DataStallError
from dsclip.data.images import ImageTooLarge, open_image
from dsclip.data.tar_reader import tar_file_members

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # per-shard sample counts and class names, written by make-shards
SKIP_KINDS = ("bad_image", "empty_image", "no_image", "no_caption", "bad_shard", "too_large")
# Consecutive unusable samples after which a worker gives up instead of spinning forever on a broken source.
MAX_CONSECUTIVE_BAD = 1000


RETRY_BASE_S = 1.0  # first wait before a failed shard is read again; doubled on each further failure


class TooLargeMember:
    """Stands in for the data of a tar member above data.webdataset.max_member_mb (never read)."""


def tar_members(stream: Any, url: str, max_bytes: int) -> Iterator[dict[str, Any]]:
    """{"fname", "data", "__url__"} of each regular member, as webdataset's tar_file_iterator gives
    them to group_by_keys, except that a member above `max_bytes` is skipped unread: webdataset
    reads every member whole into memory, so one hostile member of any size would take a worker's
    memory. Read with dsclip's tar reader (dsclip.data.tar_reader), not tarfile: a third of the
    loader's time per image went to tarfile's headers."""
    for name, data in tar_file_members(stream, max_bytes):
        if re.match(r"__[^/]*__($|/)", name):  # webdataset's metadata members
            continue
        yield {"fname": name, "data": TooLargeMember() if data is None else data, "__url__": url}


def _guarded(members: Iterator[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """`members` until a damaged tar raises: handed to `handler`, the shard ends there. A read that
    fails (OSError: storage, network) is not the data's fault and goes up, to be retried."""
    try:
        yield from members
    except OSError as exn:
        if not isinstance(exn, gzip.BadGzipFile):
            raise
        handler(exn)
    except Exception as exn:  # tarfile.ReadError, zlib.error, EOFError: a corrupt archive is bad data, not a stopped run
        handler(exn)


def expand_urls(pattern: str) -> list[str]:
    """Expand one source ('::'-joined brace patterns) into its shard URLs."""
    return wds.shardlists.expand_urls(pattern)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _manifest_counts(shards: list[str]) -> Optional[list[int]]:
    """Per-shard sample counts from manifest.json beside local shards, or None if any shard is not covered."""
    counts, manifests = [], {}
    for url in shards:
        path = url[len("file://"):] if url.startswith("file://") else url
        if not _is_local(path):
            return None
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in manifests:
            manifests[folder] = shard_counts(folder)
        entry = manifests[folder].get(os.path.basename(path))
        if entry is None:
            return None
        counts.append(entry)
    return counts


def read_manifest(folder: str) -> dict[str, Any]:
    """folder/manifest.json as written by dsclip.data.shard_writer; {} when absent."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def shard_counts(folder: str) -> dict[str, int]:
    """{shard file name: samples} from folder's manifest; {} when it has none."""
    return {s["name"]: int(s["samples"]) for s in read_manifest(folder).get("shards", [])}


def _check_local_shards(sources: list[list[str]], patterns: list[str]) -> None:
    for shards, pattern in zip(sources, patterns):
        for url in shards:
            path = url[len("file://"):] if url.startswith("file://") else url
            if _is_local(path) and not os.path.isfile(path):
                raise FileNotFoundError(f"webdataset shard not found: {path} (from data.webdataset.urls entry {pattern!r})")


@dataclass
class _Plan:
    """Which shards each (rank, worker) reads; identical on every rank."""

    sources: list[list[str]]  # shard URLs per source (resampled)
    weights: list[float]  # per source (resampled)
    assigned: list[list[list[str]]]  # [rank][worker] -> shard URLs (non-resampled)
    steps_per_epoch: int


def _make_plan(cfg: WebDataConfig, *, batch_size: int, world_size: int, num_workers: int, seed: int, shuffle: bool) -> _Plan:
    sources = [expand_urls(p) for p in cfg.urls]
    for shards, pattern in zip(sources, cfg.urls):
        if not shards:
            raise ValueError(f"data.webdataset.urls entry {pattern!r} expands to no shards")
    _check_local_shards(sources, cfg.urls)
    weights = list(cfg.weights) if cfg.weights else [1.0] * len(sources)
    n_workers = max(1, num_workers)
    if cfg.resampled:
        steps = cfg.train_num_samples // (world_size * batch_size)
        if steps == 0:
            raise ValueError(f"data.webdataset.train_num_samples={cfg.train_num_samples} is less than one global batch ({world_size} x {batch_size})")
        return _Plan(sources, weights, [], steps)

    shards = [u for s in sources for u in s]
    known = [_manifest_counts(s) for s in sources]
    if all(k is not None for k in known):
        counts = [c for k in known for c in k]
    elif cfg.train_num_samples > 0:
        counts = [cfg.train_num_samples / len(shards)] * len(shards)
    else:
        raise ValueError("data.webdataset: shards have no manifest.json with per-shard counts; set train_num_samples")
    if len(shards) < world_size:
        raise ValueError(f"data.webdataset: {len(shards)} shards for {world_size} ranks; non-resampled mode needs at least one shard per rank")
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"shard-assignment-{seed}").shuffle(order)
    assigned, rank_batches = [], []
    for rank in range(world_size):
        per_rank = order[rank::world_size]
        workers = [per_rank[w::n_workers] for w in range(n_workers)]
        assigned.append([[shards[i] for i in ids] for ids in workers])
        rank_batches.append(sum(int(sum(counts[i] for i in ids) // batch_size) for ids in workers))
    if len(shards) < world_size * n_workers:
        log.warning("data.webdataset: %d shards for %d ranks x %d workers: some workers stay idle", len(shards), world_size, n_workers)
    steps = min(rank_batches)
    if steps == 0:
        raise ValueError(f"data.webdataset: a rank holds fewer than batch_size={batch_size} samples per worker; use fewer workers or a smaller batch")
    return _Plan(sources, weights, assigned, steps)


def _shuffle(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


def _first(sample: dict[str, Any], keys: list[str]) -> Optional[bytes]:
    for k in keys:
        if k in sample:
            return sample[k]
    return None


def caption_lines(text: str) -> list[str]:
    """The captions of a text member: one per non-blank line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def sample_captions(sample: dict[str, Any], caption_keys: list[str]) -> list[str]:
    """A sample's captions: the lines of its first caption member (one caption per line), else the
    "captions" list of its .json; empty when it has none."""
    text = _first(sample, caption_keys)
    if text is not None and not isinstance(text, TooLargeMember):
        return caption_lines(text.decode("utf-8", errors="replace"))
    try:
        listed = json.loads(sample["json"]).get("captions", []) if "json" in sample else []
    except (ValueError, AttributeError, TypeError):  # a .json that is not an object: no captions in it
        return []
    return [c.strip() for c in listed if isinstance(c, str) and c.strip()] if isinstance(listed, list) else []


@dataclass
class _Position:
    epoch: int = 0
    step: int = 0  # batches delivered in this epoch
    pass_idx: int = 0  # 0, or the top-up pass of a rank that came up short
    pass_start: int = 0  # step at which the current pass started
    raw: list[int] = field(default_factory=list)  # per worker role: raw samples consumed up to its last delivered batch


class _ShardStream(IterableDataset):
    """Runs in each loader worker: yields (images, tokens, role, raw_pos, skip_counts), images collated but not
    finished (ImageDecoder: uint8 crops; WebLoader.finish makes them the model's input); images is None for a
    final counts-only item so skips after the last full batch still reach the main process."""

    def __init__(self, cfg: WebDataConfig, plan: _Plan, *, decode: ImageDecoder, tokenizer: Callable, batch_size: int,
                 rank: int, n_workers: int, seed: int, shuffle: bool, pos: _Position):
        self.cfg, self.plan, self.decode, self.tokenizer = cfg, plan, decode, tokenizer
        self.batch_size, self.rank, self.n_workers, self.seed, self.shuffle = batch_size, rank, n_workers, seed, shuffle
        self.pos = pos
        self.image_keys = cfg.image_key.split(";")
        self.caption_keys = cfg.caption_key.split(";")

    def _shard_samples(self, url: str, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Samples of one shard. A shard that cannot be opened or read (a failed pipe: command, a storage
        hiccup) is read again up to data.webdataset.shard_retries times with doubling waits, skipping the
        samples it already gave; then it is a clear error naming the shard."""
        given = 0
        for attempt in range(self.cfg.shard_retries + 1):
            try:
                for i, sample in enumerate(self._read_shard(url, counts)):
                    if i >= given:
                        given += 1
                        yield sample
                return
            except OSError as exn:
                if attempt == self.cfg.shard_retries:
                    raise OSError(f"{exn} (after {attempt + 1} attempts; data.webdataset.shard_retries="
                                  f"{self.cfg.shard_retries})") from None
                wait = RETRY_BASE_S * 2 ** attempt
                log.warning("rank %d: %s; reading it again in %.0f s (retry %d of %d)", self.rank, exn, wait,
                            attempt + 1, self.cfg.shard_retries)
                time.sleep(wait)

    def _read_shard(self, url: str, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
        """One read of a shard; a corrupt or empty tar ends the shard early (counted)."""
        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return False

        try:
            stream = gopen(url)
        except OSError as exn:
            raise OSError(redact(f"cannot open webdataset shard {url}: {exn}")) from None
        members = tar_members(stream, url, int(self.cfg.max_member_mb * 2**20))
        # Each sample goes out only once the next one has begun: the last may be cut short by a
        # failing read, which shows only at close (a pipe's exit status), and then comes again
        # whole from the retry.
        held = None
        try:
            for sample in wds.tariterators.group_by_keys(_guarded(members, handler), handler=handler):
                if held is not None:
                    yield held
                held = sample
        except OSError as exn:
            raise OSError(redact(f"cannot read webdataset shard {url}: {exn}")) from None
        try:
            stream.close()  # a pipe: reports its command's exit status here
        except OSError as exn:
            raise OSError(redact(f"cannot read webdataset shard {url}: {exn.args[0] if exn.args else exn}")) from None
        if errors:  # a damaged archive: its last sample may be partial
            counts["bad_shard"] += 1
            log.debug("skipped rest of shard %s: %r", url, errors[0])
        elif held is not None:
            yield held

    def _raw(self, role: int, rng: random.Random, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
        if not self.cfg.resampled:
            shards = list(self.plan.assigned[self.rank][role])
            if self.shuffle:
                rng.shuffle(shards)
            for url in shards:
                yield from self._shard_samples(url, counts)
            return
        streams = [self._resampled_source(i, rng, counts) for i in range(len(self.plan.sources))]
        while True:
            i = rng.choices(range(len(streams)), weights=self.plan.weights)[0]
            yield next(streams[i])

    def _resampled_source(self, i: int, rng: random.Random, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
        shards, empty_in_a_row = self.plan.sources[i], 0
        while True:
            got = False
            for sample in self._shard_samples(rng.choice(shards), counts):
                got = True
                yield sample
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(shards) + 10:
                raise RuntimeError(f"data.webdataset source {self.cfg.urls[i]!r} yields no samples from any shard")

    def _decode(self, sample: dict[str, Any], seed: int) -> tuple[Optional[tuple[torch.Tensor, str]], Optional[str]]:
        """The sample's (image, caption), or the reason it is unusable. The transform's random draws and, for a
        sample with several captions, the caption picked come from `seed` (from the sample's place in the stream
        and the epoch), not from the worker's RNG, whose state depends on what the worker decoded before: a
        resumed worker skips those samples undecoded."""
        data = _first(sample, self.image_keys)
        if data is None:
            return None, "no_image"
        if isinstance(data, TooLargeMember):
            return None, "too_large"
        if len(data) == 0:
            return None, "empty_image"
        captions = sample_captions(sample, self.caption_keys)
        if not captions:
            return None, "no_caption"
        caption = captions[0] if len(captions) == 1 else random.Random(seed).choice(captions)
        try:
            with open_image(io.BytesIO(data)) as img, seeded(seed):
                image = self.decode.prepare(img)
        except ImageTooLarge:
            return None, "too_large"
        except Exception as exn:  # any decoder or transform failure is a bad sample, never a stopped run
            log.debug("bad image %s in %s: %r", sample.get("__key__"), sample.get("__url__"), exn)
            return None, "bad_image"
        return (image, caption), None

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        role = (slot + self.pos.step - self.pos.pass_start) % self.n_workers
        start = self.pos.raw[role] if self.pos.raw else 0
        rng = random.Random(f"{self.seed}-{self.pos.epoch}-{self.pos.pass_idx}-{self.rank}-{role}")
        counts = dict.fromkeys(SKIP_KINDS, 0)
        buffer = self.cfg.shuffle_buffer if self.shuffle else 0
        images, captions, n_raw, bad_in_a_row = [], [], 0, 0
        for sample in _shuffle(self._raw(role, rng, counts), buffer, rng):
            n_raw += 1
            if n_raw <= start:  # replaying up to the saved position: no decoding
                continue
            decoded, kind = self._decode(sample, hash((self.seed, self.pos.epoch, self.pos.pass_idx, self.rank, role,
                                                       n_raw)) % 2**63)
            if decoded is None:
                counts[kind] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(f"data.webdataset: {bad_in_a_row} unusable samples in a row (last from {sample.get('__url__')}); skip counts {counts}")
                continue
            bad_in_a_row = 0
            images.append(decoded[0])
            captions.append(decoded[1])
            if len(images) == self.batch_size:
                yield self.decode.collate(images), self.tokenizer(captions), role, n_raw, dict(counts)
                images, captions = [], []
                counts.update(dict.fromkeys(SKIP_KINDS, 0))  # in place: the shard readers hold this dict too
        if any(counts.values()):
            yield None, None, role, n_raw, dict(counts)


class WebLoader:
    """One epoch of exactly len(self) batches (images, tokens (b,ctx) long) per iteration; images as the
    workers collate them (uint8 crops (b,H,W,3) with open_clip's training transform), made (b,3,H,W)
    float by finish(), after the move to the model's device.

    set_epoch(e) moves to the start of epoch e unless the loader is already inside e (after load_state_dict);
    a completed iteration moves on to the next epoch. skipped() returns cumulative skip counts per kind.
    """

    def __init__(self, cfg: WebDataConfig, plan: _Plan, *, decode: ImageDecoder, tokenizer: Callable, batch_size: int,
                 rank: int, num_workers: int, seed: int, shuffle: bool):
        self.cfg, self.plan, self.decode, self.tokenizer = cfg, plan, decode, tokenizer
        self.batch_size, self.rank, self.num_workers, self.seed = batch_size, rank, num_workers, seed
        self.shuffle = shuffle
        self.n_workers = max(1, num_workers)
        self._pos = _Position(raw=[0] * self.n_workers)
        self._skipped = dict.fromkeys(SKIP_KINDS, 0)

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._pos.epoch:
            self._pos = _Position(epoch=epoch, raw=[0] * self.n_workers)

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's images as the model takes them (ImageDecoder.finish), on whatever device they are."""
        return self.decode.finish(images)

    def state_dict(self) -> dict[str, Any]:
        p = self._pos
        return {"epoch": p.epoch, "step": p.step, "pass_idx": p.pass_idx, "pass_start": p.pass_start,
                "raw": list(p.raw), "skipped": dict(self._skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["raw"]) != self.n_workers:
            raise ValueError(f"data position was saved with {len(state['raw'])} loader workers, this run has {self.n_workers}: "
                             "resume with the same data.num_workers")
        self._pos = _Position(state["epoch"], state["step"], state["pass_idx"], state["pass_start"], list(state["raw"]))
        self._skipped = {k: int(state["skipped"].get(k, 0)) for k in SKIP_KINDS}

    def _loader(self) -> DataLoader:
        stream = _ShardStream(self.cfg, self.plan, decode=self.decode, tokenizer=self.tokenizer,
                              batch_size=self.batch_size, rank=self.rank, n_workers=self.n_workers, seed=self.seed,
                              shuffle=self.shuffle, pos=_Position(**{**vars(self._pos), "raw": list(self._pos.raw)}))
        timeout = self.cfg.timeout_s if self.num_workers > 0 else 0
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, timeout=timeout)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pos, steps = self._pos, self.plan.steps_per_epoch
        epoch_skips = dict.fromkeys(SKIP_KINDS, 0)
        while pos.step < steps:
            delivered = 0
            it = iter(self._loader())
            while pos.step < steps:
                try:
                    images, tokens, role, raw_pos, counts = next(it)
                except StopIteration:
                    break
                except RuntimeError as exn:
                    if "timed out" in str(exn):
                        raise DataStallError(f"rank {self.rank}: no batch from the data loader workers in {self.cfg.timeout_s:.0f}s "
                                             f"(epoch {pos.epoch}, step {pos.step}); a pipe: command or the storage may be stuck, "
                                             "or raise data.webdataset.timeout_s") from exn
                    raise
                for k, v in counts.items():
                    epoch_skips[k] += v
                    self._skipped[k] += v
                pos.raw[role] = raw_pos
                if images is None:
                    continue
                pos.step += 1
                delivered += 1
                yield images, tokens
            del it
            if pos.step < steps:
                if delivered == 0:
                    raise RuntimeError(f"rank {self.rank}: the data loader produced no usable batch (epoch {pos.epoch}, "
                                       f"step {pos.step} of {steps}); skip counts {epoch_skips}")
                log.warning("rank %d: data ran out at step %d of %d in epoch %d; topping up from a new pass over this "
                            "rank's shards", self.rank, pos.step, steps, pos.epoch)
                pos.pass_idx, pos.pass_start, pos.raw = pos.pass_idx + 1, pos.step, [0] * self.n_workers
        if any(epoch_skips.values()):
            log.warning("rank %d epoch %d: skipped %d unusable samples (%s)", self.rank, pos.epoch, sum(epoch_skips.values()),
                        ", ".join(f"{k}={v}" for k, v in epoch_skips.items() if v))
        self._pos = _Position(epoch=pos.epoch + 1, raw=[0] * self.n_workers)


def build_webdataset_loader(cfg: WebDataConfig, *, transform: Callable, tokenizer: Callable, batch_size: int,
                            world_size: int = 1, rank: int = 0, seed: int = 0, num_workers: int = 0, train: bool = True,
                            reduced_decode: bool = True) -> WebLoader:
    """Build the per-rank WebDataset loader; len() of the result is steps_per_epoch, equal on every rank.

    transform: PIL image -> float tensor (open_clip's preprocess_train / preprocess_val); tokenizer: list[str] ->
    LongTensor (b, context_length). train=False reads shards and samples in a fixed order (no shuffling).
    reduced_decode: decode large JPEGs at the size the transform's crop needs (dsclip.data.decode).
    A missing local shard raises FileNotFoundError here, before any worker starts.
    """
    cfg.validate()
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad loader geometry: batch_size={batch_size}, world_size={world_size}, rank={rank}, num_workers={num_workers}")
    plan = _make_plan(cfg, batch_size=batch_size, world_size=world_size, num_workers=num_workers, seed=seed, shuffle=train)
    return WebLoader(cfg, plan, decode=ImageDecoder(transform, reduced_decode), tokenizer=tokenizer,
                     batch_size=batch_size, rank=rank, num_workers=num_workers, seed=seed, shuffle=train)
