"""The best model under a size budget: per-tensor KLD sensitivity (sensitivity.py) over the types
llama-quantize can write for each tensor (menu.py), and the allocation of a type per tensor under a
file-size or bits-per-weight budget (allocate.py). docs/budget.md has the method and the numbers."""
