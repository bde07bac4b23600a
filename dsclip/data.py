"""Training data: data set by kind, this rank's share of it, and a resumable position."""
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsclip import synthetic
from dsclip.synthetic import SyntheticConfig
from dsclip.model import ModelBundle

EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic images come from a seed range training never uses


@dataclass
class DataConfig:
    kind: Literal["synthetic"] = "synthetic"  # where training pairs come from
    batch_size: int = 64  # micro-batch per rank
    num_workers: int = 0  # DataLoader worker processes per rank
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        self.synthetic.validate()


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


class SyntheticLabelled(Dataset):
    """(image tensor, class label) from the held-out seed range, for zero-shot evaluation."""

    def __init__(self, cfg: SyntheticConfig, seed: int, transform: Callable, render_size: int):
        self.cfg, self.seed, self.transform, self.render_size = cfg, seed + EVAL_SEED_OFFSET, transform, render_size

    def __len__(self) -> int:
        return self.cfg.eval_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, label = synthetic.render_sample(self.seed, index, self.cfg.num_classes, self.render_size)
        return self.transform(image), label


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


@dataclass
class TrainData:
    loader: DataLoader
    sampler: EpochSampler

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.sampler.batches_per_epoch


def build_train_data(cfg: DataConfig, bundle: ModelBundle, rank: int, world_size: int, seed: int) -> TrainData:
    dataset = SyntheticCaptions(cfg.synthetic, seed, bundle.train_transform, bundle.tokenizer,
                                render_size=2 * max(bundle.image_size))
    sampler = EpochSampler(len(dataset), cfg.batch_size, rank, world_size, seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, persistent_workers=False)
    return TrainData(loader=loader, sampler=sampler)
