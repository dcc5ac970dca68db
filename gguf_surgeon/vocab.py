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
    GGML_QUANT_SIZES as _GGUF_PY_QUANT_SIZES,
)
from gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

__all__ = [
    "BASE_MODEL_PREFIX",
    "GGML_QUANT_SIZES",
    "OUTPUT",
    "OUTPUT_NORM",
    "TOKEN_EMBD",
    "base_model_key",
    "file_type_name",
    "GGUF_DEFAULT_ALIGNMENT",
    "GGUF_MAGIC",
    "GGUF_VERSION",
    "GGMLQuantizationType",
    "GGUFValueType",
    "Keys",
    "LlamaFileType",
]

# (block size, bytes per block) of each type, as ggml has them: gguf-py gives Q8_1 40 bytes (an
# old layout with float scales); ggml's block_q8_1 is two halfs and 32 int8, 36 bytes
GGML_QUANT_SIZES = {**_GGUF_PY_QUANT_SIZES, GGMLQuantizationType.Q8_1: (32, 36)}

# tensor names gguf defines (TENSOR_NAMES) that the periphery reads by name
TOKEN_EMBD = f"{TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]}.weight"
OUTPUT = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT]}.weight"
OUTPUT_NORM = f"{TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM]}.weight"

# general.base_model.{id}.* (gguf's Keys.General.BASE_MODEL_*): the provenance entries of a base
BASE_MODEL_PREFIX = Keys.General.BASE_MODEL_COUNT.removesuffix("count")


def base_model_key(template: str, index: int = 0) -> str:
    """One general.base_model.{id}.* key, e.g. base_model_key(Keys.General.BASE_MODEL_NAME)."""
    return template.format(id=index)


def file_type_name(value: object) -> str | None:
    """general.file_type as llama.cpp names it (Q8_0, F16; no MOSTLY_/ALL_ prefix); None when
    absent; any other value (unknown number, inf, an array, text) as its text."""
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        text = str(value)
        return text if len(text) <= 40 else text[:37] + "..."
