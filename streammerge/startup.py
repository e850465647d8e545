"""What a run does before torch is imported: everything that needs only the plan and the disk.

``import torch`` takes 1.5-3 s, during which a merge can compute nothing. :func:`streammerge.run`
spends that time on the disk instead: it checks the inputs, the output folder and the machine's
resources, starts the readahead and the direct reads of the first base tiles, opens the output
(``OUT.partial``, shards reserved, headers written) and queues the copies of the tensors no
adapter touches (embeddings, norms), which the writer thread makes while torch loads.

The journal entries of those copies are queued only by the executor, once it knows the run can
go on (a usable device, a VRAM budget that fits): a run that fails before that leaves no
journaled work, so :meth:`Startup.abort` removes ``OUT.partial`` as if nothing had started.

Torch-free on purpose.
"""

from __future__ import annotations

import os

from streammerge import preflight
from streammerge.direct import DirectTiles, use_direct
from streammerge.plan import PREFETCH_TILES, Plan, check_inputs_unchanged, check_output, out_tile_bytes, tile_ranges
from streammerge.readahead import Readahead
from streammerge.write import WriteQueue, Writer


class Startup:
    """A run's start: :meth:`begin` it, hand it to :func:`streammerge.execute.run`, then :meth:`close` it.

    After a failure that the executor did not handle (one raised before it started, such as no
    usable GPU), call :meth:`abort`. Both are safe to call more than once, and after each other.

    Example::

        startup = Startup(plan)
        try:
            startup.begin()
            import streammerge.execute  # torch loads while the disk works
            report = streammerge.execute.run(plan, startup=startup)
        except BaseException:
            startup.abort()
            raise
        finally:
            startup.close()
    """

    def __init__(self, plan: Plan, *, resume: bool = False, reads: str = "auto") -> None:
        self.plan = plan
        self.resume = resume
        self.direct_reads = use_direct(plan, reads)
        """Whether base tiles are read with O_DIRECT (:mod:`streammerge.direct`)."""
        self.readahead = Readahead(plan, skip_tiles=self.direct_reads)
        self.writer = Writer(plan, resume=resume)
        self.queue: WriteQueue | None = None
        self.direct: DirectTiles | None = None
        self.copied: tuple[int, ...] = ()
        """Units whose copy is queued; the executor queues their journal entries."""
        self._fds: dict[str, int] = {}

    def begin(self) -> None:
        """Check, start reading, open the output and queue the copies (raises StreamMergeError or OSError)."""
        plan = self.plan
        check_inputs_unchanged(plan)
        check_output(plan.out, [plan.base, *plan.adapters], plan.overwrite)
        preflight.check(plan)
        self.readahead.start()
        self.writer.open()  # on resume, reads the journal: the units left are known from here on
        left = [u for i, u in enumerate(plan.units) if i not in self.writer.done]
        if self.direct_reads:
            self.direct = DirectTiles(tile_ranges(left), ahead=PREFETCH_TILES)
            self.direct.start()
        self.queue = WriteQueue(self.writer, plan.write_buffers, out_tile_bytes(plan.units))
        copied = []
        for index, unit in enumerate(plan.units):
            if unit.op == "copy" and index not in self.writer.done:
                src = unit.source
                self.queue.copy(unit.shard, unit.offset, unit.name, self._fd(src.file), src.offset, src.nbytes)
                copied.append(index)
        self.copied = tuple(copied)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fds[path]

    def abort(self) -> bool:
        """Drop the queued work and abort the output; True when ``OUT.partial`` is kept (journaled
        work of an earlier, resumed run)."""
        if self.queue is not None:
            self.queue.cancel()
        kept = self.writer.abort()
        self.close()
        return kept

    def close(self) -> None:
        """Stop the reading threads and close the copies' sources (after the queue is closed or cancelled)."""
        self.readahead.close()
        if self.direct is not None:
            self.direct.close()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
