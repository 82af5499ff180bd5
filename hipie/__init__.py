"""hipie package."""
