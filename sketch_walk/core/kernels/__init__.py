"""Triton kernels of the shared block-sparse attention (imported lazily: Triton is only needed on this path).

* :mod:`.block_sparse_prefill` -- ``block_sparse_attention_triton`` (prefill, GQA-packed, causal diagonal,
  optional sliding window)
* :mod:`.block_sparse_decode` -- ``block_sparse_decode_triton`` (one query per sequence, split over kept blocks)
* :mod:`._launch` -- host-side helpers every Triton wrapper of the project uses (layout checks, sizes,
  :class:`._launch.TunedKernel`)

Both take the kept-block lists of :mod:`sketch_walk.core.block_sparse` and return (out, lse) like its
PyTorch references. Every method's selection feeds them; no method code lives here.
"""
