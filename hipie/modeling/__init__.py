"""HIPIE network modules, one per box of Fig. 3 (no I/O)."""
