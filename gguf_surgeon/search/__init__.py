"""search: find the best surgery automatically (see `study` for how it works).

The names a caller needs, importable from here: `load_space` and `PRESETS` (space),
`SearchOptions` (storage), `run_search` and `search_status` (study).
"""

from .space import PRESETS, load_space
from .storage import SearchOptions
from .study import run_search, search_status

__all__ = ["PRESETS", "SearchOptions", "load_space", "run_search", "search_status"]
