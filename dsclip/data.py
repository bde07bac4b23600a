"""Training data: data set by kind, this rank's share of it, and a resumable position."""
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsclip import synthetic
from dsclip.synthetic import SyntheticConfig
from dsclip.model import ModelBundle
from dsclip.tabular import CsvConfig, CsvDataset, FolderConfig, FolderDataset
from dsclip.webdata import WebDataConfig, WebLoader, build_webdataset_loader

@dataclass
class DataConfig:
    kind: Literal["synthetic", "webdataset", "csv", "folder"] = "synthetic"  # synthetic | webdataset | csv | folder: where training pairs come from
    batch_size: int = 64  # micro-batch per rank
    num_workers: int = 0  # DataLoader worker processes per rank
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # kind: synthetic
    webdataset: WebDataConfig = field(default_factory=WebDataConfig)  # kind: webdataset (tar shards)
    csv: CsvConfig = field(default_factory=CsvConfig)  # kind: csv (image path + caption columns)
    folder: FolderConfig = field(default_factory=FolderConfig)  # kind: folder (one subfolder per class)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        getattr(self, self.kind).validate()  # only the selected source must be complete


class SyntheticCaptions(Dataset):
    """(image tensor, caption tokens) pairs rendered on demand."""

    def __init__(self, cfg: SyntheticConfig, seed: int, transform: Callable, tokenizer: Callable,
                 render_size: int):
        self.cfg, self.seed, self.transform, self.render_size = cfg, seed, transform, render_size
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.cfg.train_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, caption, _ = synthetic.render_sample(self.seed, index, self.cfg.num_classes, self.render_size)
        return self.transform(image), self.tokenizer([caption])[0]


class EpochSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation, from a given batch on.

    Every rank gets the same number of full batches (the ragged tail of the permutation is
    dropped), so ranks stay in lockstep; `set_position` makes resuming mid-epoch exact.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.batches_per_epoch = size // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"data set of {size} samples is smaller than one global batch "
                             f"({world_size} ranks x {batch_size}): lower data.batch_size or add data")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        used = self.batches_per_epoch * self.world_size * self.batch_size
        mine = torch.randperm(self.size, generator=generator)[:used][self.rank::self.world_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) around each sample, so random augmentation of a
    sample does not depend on which worker loads it or on what was loaded before: a run resumed
    mid-epoch sees exactly the images an uninterrupted run would have seen."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.dataset[index]


class MapStyleData:
    """A map-style data set read in seeded per-epoch order; the position is (epoch, batch)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int, seed: int):
        self.dataset = dataset
        self.samples = SeededSamples(dataset, seed)
        self.sampler = EpochSampler(len(dataset), batch_size, rank, world_size, seed)
        self.loader = DataLoader(self.samples, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=num_workers)
        self.epoch, self.batch = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of `epoch` from the current position (its start, unless restored mid-epoch)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        self.sampler.set_position(self.epoch, self.batch)
        self.samples.epoch = epoch  # before the iterator starts: workers copy the data set then
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        for batch in self.loader:
            self.batch += 1
            yield batch

    def at_epoch_end(self) -> bool:
        return self.batch >= self.steps_per_epoch

    def skipped(self) -> dict[str, int]:
        return self.dataset.skipped() if hasattr(self.dataset, "skipped") else {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


class ShardData:
    """WebDataset shards through dsclip.webdata; the loader keeps its own resumable position."""

    def __init__(self, loader: WebLoader):
        self.loader = loader

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def at_epoch_end(self) -> bool:
        return self.loader.state_dict()["step"] >= len(self.loader)

    def skipped(self) -> dict[str, int]:
        return self.loader.skipped()

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


TrainData = Union[MapStyleData, ShardData]


def build_train_data(cfg: DataConfig, bundle: ModelBundle, rank: int, world_size: int, seed: int) -> TrainData:
    if cfg.kind == "webdataset":
        return ShardData(build_webdataset_loader(
            cfg.webdataset, transform=bundle.train_transform, tokenizer=bundle.tokenizer, batch_size=cfg.batch_size,
            world_size=world_size, rank=rank, seed=seed, num_workers=cfg.num_workers))
    if cfg.kind == "csv":
        dataset = CsvDataset(cfg.csv, transform=bundle.train_transform, tokenizer=bundle.tokenizer)
    elif cfg.kind == "folder":
        dataset = FolderDataset(cfg.folder, transform=bundle.train_transform, tokenizer=bundle.tokenizer)
    else:
        dataset = SyntheticCaptions(cfg.synthetic, seed, bundle.train_transform, bundle.tokenizer,
                                    render_size=2 * max(bundle.image_size))
    return MapStyleData(dataset, cfg.batch_size, cfg.num_workers, rank, world_size, seed)
