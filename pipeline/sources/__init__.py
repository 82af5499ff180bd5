"""Sources: a labeling run's inputs (image folders, SA-1B tar shards, manifests; local paths or
fsspec URIs) listed as shards, the unit of work and of output (``listing``), and read as
streams of undecoded image records (``reading``); untrusted image bytes decoded to RGB arrays
sized for the model (``decode``). Plain functions on picklable values, so they run on the driver and in Ray tasks
alike; an image that cannot be read or decoded becomes a record or an exception with a reason,
never a lost image.
"""
