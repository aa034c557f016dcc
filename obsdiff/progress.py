"""Progress bars that leave nothing on the terminal when the work they show fails.

tqdm closes a bar whose loop is abandoned (an exception in the loop body finalizes the bar's iterator) or
whose `with` block raises, and with `leave=True` it then redraws the unfinished bar and ends its line: its
last frame would stay above the one error line the command prints. These bars blank their line instead;
bars that finish stay as `leave` asks. Bars that are never closed (made without a loop or `with`) are
cleared by the command line's error handler (`cli_utils.clear_progress_bars`).
"""

from __future__ import annotations

from tqdm.auto import tqdm as _tqdm


class tqdm(_tqdm):
    """`tqdm.auto.tqdm` that clears itself when its loop or `with` block ends in an exception."""

    def __iter__(self):
        if self.disable:
            yield from self.iterable
            return
        finished = False
        try:
            for item in self.iterable:
                yield item
                self.update()
            finished = True
        finally:  # GeneratorExit when the loop body raised (or broke off): not finished, so no trace left
            if not finished:
                self.leave = False
            self.close()

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            self.leave = False
        return super().__exit__(exc_type, exc_value, traceback)
