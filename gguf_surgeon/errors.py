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


class ToolNotFoundError(ToolError):
    """A llama.cpp tool (or the --llama-bin folder) is not where it was looked for."""


class ToolFailedError(ToolError):
    """A llama.cpp tool ran and failed: bad exit status, no answer in time, output not understood."""


class OptionError(SurgeonError):
    """Options that cannot go together or a value out of range, found by the library (the CLI's
    own parsing errors stay click usage errors)."""


class ForwardError(SurgeonError):
    """The reference forward pass cannot run this model or these inputs (architecture,
    missing tensor, unsupported RoPE scaling, token or block index out of range)."""


class RankError(SurgeonError):
    """The text cannot be scored (empty, too short) or the plot cannot be written."""


class EvalError(SurgeonError):
    """The evaluation cannot run as asked (text too short, vocabularies differ, bad suite file)."""


class SearchError(SurgeonError):
    """A space, storage or study that cannot be used (bad TOML, unknown family, other base)."""


class ReleaseError(SurgeonError):
    """A release, card or Modelfile cannot be made (unrecognized template, bad parameter, folder in the way)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised by the command line's handler (a KeyboardInterrupt, so
    every cleanup that handles Ctrl-C handles the others the same way)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
