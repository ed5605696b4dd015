"""yoloq's version (``yoloq --version``, run-folder markers), in the lowest layer so every module may read it."""
__version__ = "0.3.0"
