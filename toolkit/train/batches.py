"""How batches are drawn from a dataset's splits (data.py): who trains on what, and the batches themselves.

Two sources give the same (B, 3, H, W) uint8 batches:
  memory  the split decoded once into one uint8 tensor (cached on disk, see cache.py),
          moved to the device once, indexed per batch: no per-sample Python.
  stream  files decoded every epoch by DataLoader workers, for data larger than memory.
Augmentation (random crop with padding, flip) and normalisation happen afterwards on the
device, on whole batches, identically for both sources.

Randomness is counter-based: the shuffle of epoch e comes from a generator seeded with
(seed, e, 0), and each augmentation op draws sample i's parameters for epoch e from its own
stream (seed, e, op), see augment.py. Nothing depends on the rank, the world
size or how far a previous process got, which is what makes resume exact and makes 2
processes with batch B/2 see the same samples as 1 process with batch B.
"""

from __future__ import annotations

import logging

import torch

from toolkit import UserError
from toolkit.config import DataConfig
from toolkit.core import images
from toolkit.train.augment import EpochAugment, stream
from toolkit.train.data import Split

log = logging.getLogger(__name__)


class TrainPlan:
    """Which sample indices each process trains on, batch by batch, in each epoch.

    The epoch's permutation is cut to a multiple of the world size and dealt round-robin,
    like DistributedSampler: process r gets perm[r::world]. Batch k of every process
    together is perm[k*B*world : (k+1)*B*world], the same samples a single process with
    batch B*world takes at step k. The batch count is a multiple of grad_accum, so an
    optimizer step never straddles two epochs. The two are equal in exact arithmetic; in
    float32 they round differently (another batch size and thread count), and a ReLU input
    within that rounding of zero passes a gradient in one run only, so the weights can part
    by more than rounding. tests/test_processes.py compares them in float64.

    With drop_last, an epoch's incomplete last batch is left out (a random few samples each epoch,
    as DataLoader(drop_last=True)): a batch of a few images gives BatchNorm noisy statistics.

    No process ever gets a batch of one image (BatchNorm in train mode cannot normalise a
    single value per channel): a last batch of one image per process joins the batch before
    it (B + 1 images). That is the one place where N processes with batch B and one process
    with batch B*N group samples differently: the last step of N processes holds (B+1)*N
    images, where one process takes B*N and then N. Both are functions of (n, B, world), so
    resume stays exact.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, grad_accum: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.per_rank = n // world
        full, tail = divmod(self.per_rank, batch_size)
        if drop_last and full > 0:  # an incomplete last batch is left out (other samples each epoch)
            tail = 0
        merged = tail == 1 and full > 0  # a tail of one image joins the batch before it
        batches = full + (tail > 0) - merged
        self.num_batches = batches - batches % grad_accum
        self.steps_per_epoch = self.num_batches // grad_accum  # optimizer steps: grad_accum batches each
        self.last_end = self.per_rank if merged and self.num_batches == batches else self.num_batches * batch_size
        if self.num_batches == 0 or self.per_rank < 2:
            raise UserError(
                f"the training set ({n} images) is too small for data.batch_size={batch_size} x "
                f"{world} processes x train.grad_accum={grad_accum} (every process needs a batch of at least "
                "two images); lower one of them"
            )

    def permutation(self, epoch: int) -> torch.Tensor:
        """(n,) int64: the shuffle of every sample in `epoch`, from stream 0 of the seed; the same on every process."""
        return torch.randperm(self.n, generator=stream(self.seed, epoch, 0))

    def batches(self, epoch: int, start: int = 0) -> list[torch.Tensor]:
        """Index batches of this process for `epoch`, from batch `start` on; none holds a single image."""
        mine = self.permutation(epoch)[: self.per_rank * self.world][self.rank :: self.world]
        b, last = self.batch_size, self.num_batches - 1
        return [mine[k * b : (self.last_end if k == last else (k + 1) * b)] for k in range(start, self.num_batches)]


def eval_shards(n: int, world: int, rank: int, batch_size: int) -> list[torch.Tensor]:
    """This process's validation indices (r::world, disjoint: each image counted once), batched."""
    mine = torch.arange(rank, n, world)
    return list(mine.split(batch_size)) if len(mine) else []


class Normalize(torch.nn.Module):
    """uint8 or [0, 1] float (B, 3, H, W) -> (x - mean) / std. Used in training and in the ONNX graph."""

    def __init__(self, mean, std, scale: float = 1.0 / 255):
        super().__init__()
        gain, shift = images.normalization(mean, std, scale)  # (x * scale - mean) / std as one multiply-add
        self.register_buffer("gain", torch.from_numpy(gain).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.gain + self.shift


# --- the streaming source --------------------------------------------------------------------


class FileImages(torch.utils.data.Dataset):
    """Decode files in DataLoader workers; an unreadable file gives label -100 (ignored by the loss)."""

    def __init__(self, files: list[str], labels: torch.Tensor, cfg: DataConfig):
        self.files, self.labels, self.cfg = files, labels, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            a = images.load(self.files[i], self.cfg.decoding())
            return torch.from_numpy(a).permute(2, 0, 1), self.labels[i]
        except images.DecodeError as e:
            log.warning("skipping %s: %s", self.files[i], e)
            return torch.zeros(3, self.cfg.image_size, self.cfg.image_size, dtype=torch.uint8), torch.tensor(-100)


class _IndexBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass (so workers can persist)."""

    def __init__(self):
        self.current: list[torch.Tensor] = []

    def __iter__(self):
        return iter([b.tolist() for b in self.current])

    def __len__(self) -> int:
        return len(self.current)


def _ignore_stop_signals(worker_id: int) -> None:
    """Decode workers outlive a SIGTERM sent to the whole process group, so the trainer can save first."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class BatchSource:
    """Index batches -> (x uint8 (B, 3, H, W), y int64 (B,)) on `device`, from memory or files."""

    def __init__(self, split: Split, cfg: DataConfig, device: torch.device, workers: int, keep_host: bool = True):
        self.device = device
        self.labels = split.labels.to(device)
        if split.images is not None:
            self.images = split.images.to(device)  # once: the whole split lives on the device
            if not keep_host and self.images.device != split.images.device:
                split.images = None  # release the host copy (this process would otherwise hold both)
            self.loader = None
        else:
            self.sampler = _IndexBatches()
            self.loader = torch.utils.data.DataLoader(
                FileImages(split.files, split.labels, cfg), batch_sampler=self.sampler,
                num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
                persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator(),  # its own: never draw from the global RNG (exact resume)
            )

    def __call__(self, batches: list[torch.Tensor], aug: EpochAugment | None = None):
        """Yield (x, y) per index batch, augmented by `aug` (this epoch's, from Augment.for_epoch)."""
        if self.loader is None:
            for idx in batches:
                dev_idx = idx.to(self.device, non_blocking=True)
                if aug:  # the fast path: crop and flip fused into the gather from the dataset tensor
                    yield aug.take(self.images, dev_idx, idx, self.labels[dev_idx])
                else:
                    yield self.images[dev_idx], self.labels[dev_idx]
            return
        self.sampler.current = batches
        for idx, (x, y) in zip(batches, self.loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield aug(x, idx, y) if aug else (x, y)
