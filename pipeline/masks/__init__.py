"""Class-agnostic masks, the masks the labeler votes HIPIE's classes onto: SAM's automatic mask
generator, batched over images and point prompts and kept on the device (``sam``), for images
whose source ships no SA-1B masks.
"""
