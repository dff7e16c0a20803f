"""The header check of the block files a start found on disk, off the start.

A start indexes the disk tier by name (`DiskBlockStore.list_blocks`: a stat per file, 1.7 s for
100k files on a cold page cache) instead of reading every header (10-16 s cold here). The headers
are still worth reading soon: they hold each block's tokens and parent, which its KV event
announces to the router, and a file that is corrupt, truncated or of another layout should
leave the index (and the disk) before anything counts on it. This thread reads them in the
background, newest file first (the likeliest to be asked for), and hands the scheduler each
result to apply at its next step (`OffloadManager.describe_disk_blocks`).

Nothing here decides a hit: a file found at start-up is read back whole and validated before
its first load whatever this check said (`OffloadManager.prepare_verify`), so a race between
the two costs at most a miss.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from vllm_llmd.hashing import BlockHash
from vllm_llmd.log import get_logger
from vllm_llmd.offload.disk_store import (
    CorruptBlockFileError,
    DiskBlockStore,
    MissingBlockFileError,
)

logger = get_logger(__name__)


class StartupHeaderCheck:
    """Reads the headers of `keys`' files (each worker's, one store per rank) in a daemon
    thread. `take()` returns what was checked since the last call: (key, info of rank 0's
    file) for a block whose every file is valid, (key, None) for one with an invalid file (that
    file has been deleted). A key whose file is gone (evicted meanwhile) is not reported."""

    def __init__(self, stores: Sequence[DiskBlockStore], keys: Sequence[BlockHash]) -> None:
        if not stores:
            raise ValueError("StartupHeaderCheck needs the store of every worker")
        self._stores = list(stores)
        self._keys = list(keys)
        self._lock = threading.Lock()
        self._checked: list[tuple[BlockHash, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="llmd-disk-header-check", daemon=True
        )
        self._thread.start()

    def take(self) -> list[tuple[BlockHash, str | None]]:
        with self._lock:
            checked, self._checked = self._checked, []
        return checked

    @property
    def done(self) -> bool:
        """Every key was checked (or the check was stopped)."""
        return not self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        start = time.perf_counter()
        num_invalid, first_invalid = 0, ""  # how many failed, and why the first did
        for key in reversed(self._keys):  # newest first
            if self._stop.is_set():
                return
            outcome = self._check(key)
            if outcome is None:
                continue
            valid, text = outcome
            if not valid:
                num_invalid += 1
                first_invalid = first_invalid or text
            with self._lock:
                self._checked.append((key, text if valid else None))
        root = self._stores[0].root
        if num_invalid:
            logger.warning(
                "disk offload: %d of %d blocks found in %s at start failed their header "
                "check and left the index; invalid files were deleted (first: %s)",
                num_invalid,
                len(self._keys),
                root,
                first_invalid,
            )
        logger.info(
            "disk offload: checked the headers of %d blocks found in %s in %.1f s",
            len(self._keys),
            root,
            time.perf_counter() - start,
        )

    def _check(self, key: BlockHash) -> tuple[bool, str] | None:
        """(True, rank 0's info) if every worker's file of `key` is valid; (False, why) if one
        is not; None if one is gone."""
        info = ""
        for rank, store in enumerate(self._stores):
            try:
                text = store.check_header(key)
            except MissingBlockFileError:
                return None
            except CorruptBlockFileError as exc:
                return False, str(exc)
            except Exception as exc:  # one file must not end the thread
                return False, f"block file of {key.hex()}: {exc!r}"
            if rank == 0:
                info = text
        return True, info
