"""`python -m hipie.synthetic`: write generated scenes (COCO panoptic and/or SA-1B shards)."""

from hipie.synthetic.generator import main

if __name__ == "__main__":
    raise SystemExit(main())
