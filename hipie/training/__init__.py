"""Training pieces of HIPIE: matchers, losses, the synthetic scene generator and the loop.

Submodules are imported explicitly (`from hipie.training.matcher import HungarianMatcher`) so that
importing this package stays cheap.
"""
