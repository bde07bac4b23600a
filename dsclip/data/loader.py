"""The training data of one rank, whatever its kind, behind one resumable interface:
`steps_per_epoch`, `epoch_batches(epoch)`, `finish(images)`, `at_epoch_end()`, `skipped()`,
`state_dict()` / `load_state_dict()`. Every rank gets the same number of equal batches per epoch.
A batch's images are finished (made the model's float input) after they reach the model's
device: decoded images travel as uint8 (dsclip.data.decode)."""
import logging
from typing import Any, Callable, Iterator, Protocol, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsclip.data import synthetic
from dsclip.data.config import DataConfig
from dsclip.data.decode import seeded
from dsclip.data.files import CsvDataset, FolderDataset
from dsclip.data.shards import WebLoader, build_webdataset_loader
from dsclip.errors import DataStallError

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]  # images (to finish), tokens (b, context_length) long


class ModelInputs(Protocol):
    """What data needs from the model (dsclip.model.build.ModelBundle has it)."""

    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    image_size: tuple[int, int]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]


class EpochSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation, from a given batch on.

    The permutation is the same whatever the layout: global micro-batch m of an epoch is its
    samples m*W*B .. (m+1)*W*B (W ranks of B), dealt round-robin to the ranks, so an optimizer
    step of A micro-batches takes the same W*B*A samples on any number of ranks. Every rank gets
    the same number of full batches and an epoch holds whole optimizer steps (the ragged tail of
    the permutation is dropped), so ranks stay in lockstep; `set_position` makes resuming
    mid-epoch exact.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int, accum: int = 1):
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.accum = accum
        self.batches_per_epoch = size // (world_size * batch_size * accum) * accum
        if self.batches_per_epoch == 0:
            raise ValueError(f"data set of {size} samples is smaller than one global batch ({world_size} ranks x "
                             f"{batch_size} x {accum} accumulated): lower data.batch_size or add data")
        self.epoch, self.start_batch = 0, 0

    @property
    def samples_per_batch(self) -> int:
        """Samples one micro-batch takes over all ranks."""
        return self.world_size * self.batch_size

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def indices(self) -> torch.Tensor:
        """This rank's sample indices from the current position to the end of the epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        used = self.batches_per_epoch * self.world_size * self.batch_size
        mine = torch.randperm(self.size, generator=generator)[:used][self.rank::self.world_size]
        return mine[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) around each sample, so random augmentation of a
    sample does not depend on which worker loads it or on what was loaded before: a run resumed
    mid-epoch sees exactly the images an uninterrupted run would have seen."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded(hash((self.seed, self.epoch, index)) % 2**63):
            return self.dataset[index]


class IndexedEpochs:
    """A map-style set read in EpochSampler order; the position is (epoch, batches delivered).
    Subclasses make the batches of an epoch from the sampler's position on."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler
        self.epoch, self.batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The rest of `epoch` from the current position (its start, unless restored mid-epoch)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        self.sampler.set_position(self.epoch, self.batch)
        for batch in self._batches(epoch):
            self.batch += 1
            yield batch

    def _batches(self, epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def at_epoch_end(self) -> bool:
        return self.batch >= self.steps_per_epoch

    def skipped(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The position in samples of the epoch taken by all ranks: it holds on another layout."""
        return {"epoch": self.epoch, "samples": self.batch * self.sampler.samples_per_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the samples `state` says the epoch has used, on this layout. With a new
        global batch (train --new-global-batch) they may end inside a step: the rest of that step
        is skipped, with a warning."""
        step_samples = self.sampler.samples_per_batch * self.sampler.accum
        steps, inside = divmod(state["samples"], step_samples)
        if inside:
            steps += 1
            if self.sampler.rank == 0:
                log.warning("the new global batch does not divide the %d samples epoch %d has used: the next %d "
                            "are skipped", state["samples"], state["epoch"], step_samples - inside)
        self.epoch, self.batch = state["epoch"], min(steps * self.sampler.accum, self.steps_per_epoch)


def position_in_samples(state: dict[str, Any], saved_samples_per_batch: int) -> dict[str, Any]:
    """A data position as IndexedEpochs saves it; one saved before 2026-12 counted the micro-batches
    of the saved layout (ranks x micro-batch samples each)."""
    if "batch" not in state:
        return state
    return {"epoch": state["epoch"], "samples": state["batch"] * saved_samples_per_batch}


class MapStyleData(IndexedEpochs):
    """A file-backed data set (CSV, class folders) decoded per sample, in DataLoader workers when
    `num_workers` > 0; its batches are finished by `finish` (dsclip.data.decode)."""

    def __init__(self, dataset: Union[CsvDataset, FolderDataset], batch_size: int, num_workers: int, rank: int,
                 world_size: int, seed: int, timeout_s: float = 0.0, accum: int = 1):
        super().__init__(EpochSampler(len(dataset), batch_size, rank, world_size, seed, accum))
        self.dataset, self.rank, self.timeout_s = dataset, rank, timeout_s if num_workers > 0 else 0.0
        self.samples = SeededSamples(dataset, seed)
        self.loader = DataLoader(self.samples, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers, timeout=self.timeout_s)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        self.samples.epoch = epoch  # before the iterator starts: workers copy the data set then
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        batches = iter(self.loader)
        while True:
            try:
                images, tokens = next(batches)
            except StopIteration:
                return
            except RuntimeError as exn:
                if "timed out" not in str(exn):
                    raise
                raise DataStallError(f"rank {self.rank}: no batch from the data loader workers in {self.timeout_s:.0f} s "
                                     f"(epoch {epoch}); the storage may be stuck, or raise data.worker_timeout_s") from None
            yield images, tokens

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return self.dataset.decode.finish(images)

    def skipped(self) -> dict[str, int]:
        return self.dataset.skipped()


class SyntheticData(IndexedEpochs):
    """The synthetic shapes, rendered once. The epoch's samples are rendered ahead of their steps in
    chunks that double (4 batches, 8, 16, ...): a short run renders little, a long one a few times."""

    FIRST_CHUNK_BATCHES = 4

    def __init__(self, samples: synthetic.SyntheticSet, batch_size: int, rank: int, world_size: int, seed: int,
                 accum: int = 1):
        super().__init__(EpochSampler(samples.size, batch_size, rank, world_size, seed, accum))
        self.samples, self.batch_size = samples, batch_size

    @staticmethod
    def finish(images: torch.Tensor) -> torch.Tensor:
        return images  # rendered normalised

    def _batches(self, epoch: int) -> Iterator[Batch]:
        indices = self.sampler.indices()
        rendered, chunk = 0, self.FIRST_CHUNK_BATCHES * self.batch_size
        for start in range(0, len(indices), self.batch_size):
            if start >= rendered:
                self.samples.prepare(indices[rendered:rendered + chunk])
                rendered, chunk = rendered + chunk, 2 * chunk
            yield self.samples.batch(indices[start:start + self.batch_size])


class ShardData:
    """WebDataset shards through dsclip.data.shards; the loader keeps its own resumable position."""

    def __init__(self, loader: WebLoader):
        self.loader = loader

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return self.loader.finish(images)

    def at_epoch_end(self) -> bool:
        return self.loader.state_dict()["step"] >= len(self.loader)

    def skipped(self) -> dict[str, int]:
        return self.loader.skipped()

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


TrainData = Union[MapStyleData, SyntheticData, ShardData]


def build_train_data(cfg: DataConfig, model: ModelInputs, rank: int, world_size: int, seed: int,
                     accum: int = 1) -> TrainData:
    """This rank's training data; `accum` micro-batches make one optimizer step."""
    if cfg.kind == "webdataset":
        return ShardData(build_webdataset_loader(
            cfg.webdataset, transform=model.train_transform, tokenizer=model.tokenizer, batch_size=cfg.batch_size,
            world_size=world_size, rank=rank, seed=seed, num_workers=cfg.num_workers, reduced_decode=cfg.reduced_decode))
    if cfg.kind == "synthetic":
        samples = synthetic.training_set(cfg.synthetic, seed, model.image_size, model.tokenizer,
                                         synthetic.Normalize(model.image_mean, model.image_std))
        return SyntheticData(samples, cfg.batch_size, rank, world_size, seed, accum)
    if cfg.kind == "csv":
        dataset = CsvDataset(cfg.csv, transform=model.train_transform, tokenizer=model.tokenizer,
                             reduced_decode=cfg.reduced_decode)
    else:
        dataset = FolderDataset(cfg.folder, transform=model.train_transform, tokenizer=model.tokenizer,
                                reduced_decode=cfg.reduced_decode)
    return MapStyleData(dataset, cfg.batch_size, cfg.num_workers, rank, world_size, seed, cfg.worker_timeout_s, accum)
