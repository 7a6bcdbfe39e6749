"""Lowering: how the rewritten graph runs (AOTAutograd + Inductor, or the debug ladder)."""
