"""Progress bars: tqdm's notebook widget where Jupyter can draw one, its text bar elsewhere.

``tqdm.auto`` decides on import, and in a Jupyter kernel without ipywidgets it prints
"IProgress not found" to every user who merely imports elbogap, then falls back to the text
bar.  The same choice is made here with that warning left out: the text bar is what such a
notebook gets, and installing ipywidgets turns it into the widget.
"""

from __future__ import annotations

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
