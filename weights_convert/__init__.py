"""``python -m weights_convert``: convert LLaVA checkpoints into the minillava layout, and export back to llava-hf.

The layouts it reads live in :mod:`minillava.layouts` (``minillava.load`` reads them directly too); this package
writes them out.
"""
