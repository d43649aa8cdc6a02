"""``python -m train`` whose rank 1 fails its data check (``harness.fail_on_rank_1``), for torchrun."""

from tests.reliability.harness import fail_on_rank_1
from train.__main__ import main

if __name__ == "__main__":
    fail_on_rank_1()
    main()
