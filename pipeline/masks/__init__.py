"""Class-agnostic masks, the masks the labeler votes HIPIE's classes onto: the SA-1B mask json a
source ships beside an image, decoded and validated into ``SamMask`` records and packed for the
trip from the decode task to the labeler (``sam_json``), or, for images without one, SAM's
automatic mask generator, batched over images and point prompts and kept on the device (``sam``,
with its parts in ``amg`` and the SAM models in ``build``).
"""
