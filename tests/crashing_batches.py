"""A shard stream whose reading of one batch crashes the process natively, as a buggy decoder would on bad bytes;
a module of its own so that a forkserver worker imports it (tests/test_loader_workers.py)."""
import os
import signal

from training.data import ShardBatches


class CrashingBatches(ShardBatches):
    crash_at = 2  # the stream position whose reading segfaults, every time

    def load(self, position: int) -> dict:
        if position == self.crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().load(position)
