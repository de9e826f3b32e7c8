"""Triton kernels of Sketch&Walk's block selection (imported lazily: Triton is only needed on this path).

Prefill (composed by :mod:`.prefill_selection`, used by ``SketchWalkSelector.select_prefill`` on the "triton"
backend): :mod:`.block_pool` (steps 1 / 3b), :mod:`.block_transition` (step 4), :mod:`.row_select` (steps 5
and 7), :mod:`.walk_step` (step 6). Decode: :mod:`.decode_select` (scores, walk row and kept blocks of one
new query in 3 launches). Step numbers are those of docs/ALGORITHM.md. The attention kernels that every
method shares live in :mod:`sketch_walk.core.kernels`.
"""
