"""Generated hierarchical scenes (things with parts and subparts on textured stuff, referring
expressions, held-out compositions), used by training (`hipie.training`) and evaluation
(`hipie.evaluation`) alike. `python -m hipie.synthetic --help` writes them to disk."""
