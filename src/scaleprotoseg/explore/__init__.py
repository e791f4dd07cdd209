"""Interactive exploring of a prediction: per-cell decompositions, what-if edits, expert edits (``scaleprotoseg
explore``). The computation lives in :mod:`.decision`, :mod:`.session` and :mod:`.edits`; :mod:`.app` is the web layer.
"""
