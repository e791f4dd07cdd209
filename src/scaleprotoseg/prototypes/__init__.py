"""Prototype algorithms over a dataset (paper section 3.3; ProtoPNet's push, nearest patches and pruning).

- ``prototypes.streaming``: the one streaming best-k search (:func:`~scaleprotoseg.prototypes.streaming.best_k`):
  whole images one at a time, sharded ``rank::world_size``, the k best cells per prototype in the order
  (distance, dataset index, cell index), merged across ranks, winning cells turned into receptive-field boxes.
- ``prototypes.projection``: projection (push), duplicate removal, projected prototype patches.
- ``prototypes.nearest``: the k nearest labelled training patches of prototypes.
- ``prototypes.pruning``: ProtoSeg's ProtoPNet pruning.
- ``prototypes.boxes``: receptive-field boxes of feature cells.

Nothing is imported here: import the modules themselves.
"""
