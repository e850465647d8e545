"""How a run reads its inputs, decided once and started early.

:class:`Reading` chooses between ``O_DIRECT`` reads of the base tiles (:mod:`.direct`) and
mapped reads (:mod:`.mapped`), starts the kernel readahead for everything else
(:mod:`.readahead`), and hands the executor one :class:`~.mapped.Tiles` reader for the units it
has left to do. It is torch-free and starts before torch is imported, so the first tiles arrive
while the import runs; the torch-side readers are made only when :meth:`Reading.tiles` is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from streammerge.geometry import PREFETCH_TILES, tile_ranges
from streammerge.inputs.direct import DirectTiles, use_direct
from streammerge.inputs.readahead import Readahead
from streammerge.plan.model import Plan, WorkUnit

if TYPE_CHECKING:
    from streammerge.inputs.mapped import DirectInput, Prefetcher, SourceFiles


class Reading:
    """The inputs of one run of ``plan``: ``reads`` is a :data:`~.direct.READ_MODES` choice.

    Example::

        reading = Reading(plan, "auto")
        reading.start()                       # readahead (and direct reads) begin
        tiles = reading.tiles(files, todo)    # the reader for the units left to do
        ...
        reading.advance(bytes_consumed)       # after each unit
        reading.close()
    """

    def __init__(self, plan: Plan, reads: str = "auto", resume: bool = False) -> None:
        self.direct = use_direct(plan, reads)
        self.readahead = Readahead(plan, skip_tiles=self.direct)
        # A resumed run's tiles are known only once its journal is read: no direct reads before.
        self._direct: DirectTiles | None = (
            DirectTiles(tile_ranges(plan.units), ahead=PREFETCH_TILES) if self.direct and not resume else None
        )
        self._reader: Prefetcher | DirectInput | None = None

    @property
    def mode(self) -> str:
        """ "direct" (base tiles read with O_DIRECT) or "mmap"."""
        return "direct" if self.direct else "mmap"

    def start(self) -> None:
        self.readahead.start()
        if self._direct is not None:
            self._direct.start()

    def tiles(self, files: SourceFiles, todo: Sequence[WorkUnit]) -> Prefetcher | DirectInput:
        """The tile reader for the computed units among ``todo``, in their order (made once)."""
        from streammerge.inputs.mapped import DirectInput, Prefetcher

        ranges = tile_ranges(todo)
        if not self.direct:
            self._reader = Prefetcher(files, ranges)
            return self._reader
        if self._direct is None or self._direct.ranges != ranges:
            if self._direct is not None:
                self._direct.close()
            self._direct = DirectTiles(ranges, ahead=PREFETCH_TILES)
        self._direct.start()
        self._reader = DirectInput(files, self._direct)
        return self._reader

    def advance(self, consumed: int) -> None:
        """The merge has consumed ``consumed`` input bytes, in plan order."""
        self.readahead.advance(consumed)

    def close(self) -> None:
        """Stop every reading thread and free the buffers; safe to call twice."""
        if self._reader is not None:
            self._reader.close()
        if self._direct is not None:
            self._direct.close()
        self.readahead.close()
