"""What the agent's model may ask of the kernel: dropping cached data, attributes, names.

The FUSE adapter fills these in at start; until then (and in unit tests) they
do nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable


async def _no_wait(inode: int) -> None:
    return None


class KernelCache:
    """Invalidation callbacks, shared by the namespace, the data path and the open disks.

    invalidate(inode, attr_only=False): drop an inode's cached data (or only its
      attributes); never waits.
    invalidate_wait(inode): drop an inode's cached attributes and wait (briefly) for it.
    invalidate_entry(name): drop a cached directory entry; never waits.
    """

    def __init__(self) -> None:
        self.invalidate: Callable[..., None] = lambda inode, attr_only=False: None
        self.invalidate_wait: Callable[[int], Awaitable[None]] = _no_wait
        self.invalidate_entry: Callable[[str], None] = lambda name: None
