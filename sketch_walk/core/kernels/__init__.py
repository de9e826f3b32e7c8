"""Kernels of the shared block-sparse attention: Triton on the GPU, torch's CPU flash attention on the CPU (each
module imported lazily by the dispatch in :mod:`sketch_walk.core.block_sparse`: Triton is only needed on its path).

* :mod:`.block_sparse_prefill` -- ``block_sparse_attention_triton`` (prefill, GQA-packed, causal diagonal,
  optional sliding window)
* :mod:`.block_sparse_decode` -- ``block_sparse_decode_triton`` (one query per sequence, split over kept blocks)
* :mod:`.block_sparse_cpu` -- ``block_sparse_attention_cpu`` / ``block_sparse_decode_cpu`` (the CPU path: the
  kept blocks gathered, one flash-attention call per bucket of equal lists)
* :mod:`._launch` -- host-side helpers every Triton wrapper of the project uses (layout checks, sizes,
  :class:`._launch.TunedKernel`)

All take the kept-block lists of :mod:`sketch_walk.core.block_sparse` and return (out, lse) like its
PyTorch references. Every method's selection feeds them; no method code lives here.
"""
