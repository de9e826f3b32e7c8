"""Triton kernels of the block-sparse attention (imported lazily: Triton is only needed on this path).

* :mod:`.block_sparse_prefill` -- ``block_sparse_attention_triton`` (prefill, GQA-packed, causal diagonal)
* :mod:`.block_sparse_decode` -- ``block_sparse_decode_triton`` (one query per sequence, split over kept blocks)

Both take the kept-block lists of :mod:`sketch_walk.block_sparse` and return (out, lse) like its references.
"""
