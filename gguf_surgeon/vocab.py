"""The gguf package's format vocabulary (`gguf.constants`), without importing all of gguf.

`import gguf` pulls in numpy, yaml, the writer and the quantizers (~70 ms); a surgery that only
copies bytes needs the enums and key names alone, and on a 3 GB model that import time is a
visible share of the run. `gguf/constants.py` imports nothing but the standard library, so it
is loaded on its own and registered as `gguf.constants`: a later `import gguf` reuses the very
same module, so enum identity is preserved.
"""

from __future__ import annotations

import importlib.util
import sys

if "gguf.constants" not in sys.modules:
    _spec = importlib.util.find_spec("gguf")  # locates the package without executing it
    assert _spec is not None and _spec.submodule_search_locations, "the gguf package is not installed"
    _constants_spec = importlib.util.spec_from_file_location(
        "gguf.constants", f"{list(_spec.submodule_search_locations)[0]}/constants.py"
    )
    assert _constants_spec is not None and _constants_spec.loader is not None
    _module = importlib.util.module_from_spec(_constants_spec)
    sys.modules["gguf.constants"] = _module
    _constants_spec.loader.exec_module(_module)

from gguf.constants import (  # noqa: E402
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

__all__ = [
    "GGML_QUANT_SIZES",
    "GGUF_DEFAULT_ALIGNMENT",
    "GGUF_MAGIC",
    "GGUF_VERSION",
    "GGMLQuantizationType",
    "GGUFValueType",
    "Keys",
    "LlamaFileType",
]
