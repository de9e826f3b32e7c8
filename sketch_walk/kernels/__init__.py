"""Triton kernels of the block-sparse attention (imported lazily: Triton is only needed on this path).

* :mod:`.block_sparse_prefill` -- ``block_sparse_attention_triton`` (prefill, GQA-packed, causal diagonal)
* :mod:`.block_sparse_decode` -- ``block_sparse_decode_triton`` (one query per sequence, split over kept blocks)

Sketch&Walk's prefill selection (composed by :mod:`.prefill_selection`, used by ``SketchWalkSelector.select_prefill``
on the "triton" backend): :mod:`.block_pool` (step 1 / 3b), :mod:`.block_transition` (step 4), :mod:`.row_select`
(steps 5 and 7), :mod:`.walk_step` (step 6).

Both take the kept-block lists of :mod:`sketch_walk.block_sparse` and return (out, lse) like its references.
"""
