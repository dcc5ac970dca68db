"""One error hierarchy. Every message names the file, key, tensor or recipe token at fault."""

from __future__ import annotations


class SurgeonError(Exception):
    """Base of every error gguf-surgeon raises for a user's mistake or a bad file."""


class FormatError(SurgeonError):
    """The file is not a GGUF gguf-surgeon can read (bad magic, truncated, absurd header)."""


class ModelError(SurgeonError):
    """The GGUF is well-formed but its blocks cannot be edited (no blk.N tensors, gaps)."""


class RecipeError(SurgeonError):
    """The recipe text or file cannot be parsed; the message shows the offending token."""


class PlanError(SurgeonError):
    """A recipe step does not fit the model (index out of range, no block left, hazards)."""


class OutputError(SurgeonError):
    """The output cannot be written (folder missing, exists, same as input, disk full)."""


class ToolError(SurgeonError):
    """An external llama.cpp tool is missing or failed."""
