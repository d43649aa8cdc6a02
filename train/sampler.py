"""Which samples each step reads: deterministic global batches, cut per data-parallel rank."""

from __future__ import annotations

from data.dataset import collate
from train.distributed import World


class BatchSampler:
    """Deterministic global batches: the batch after ``consumed`` samples holds global samples
    [consumed, consumed + GBS); data-parallel rank r takes its contiguous slice, cut into micro-batches.
    Resuming at a step replays exactly the samples (and, seeded by sample, the masks) of that step."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, world: World):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.per_rank = global_batch_size // world.dp_size
        self.dp_rank = world.dp_rank

    def batches(self, consumed_samples: int) -> list:
        """This rank's micro-batches of the step after ``consumed_samples``: (Batch, global sample ids)."""
        start = consumed_samples + self.dp_rank * self.per_rank
        ids = list(range(start, start + self.per_rank))
        micro = [ids[k : k + self.mbs] for k in range(0, self.per_rank, self.mbs)]
        return [(collate([self.dataset[i % len(self.dataset)] for i in chunk]), chunk) for chunk in micro]
