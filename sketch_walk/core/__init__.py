"""The shared sparse-attention core: what every block-selection method runs on, and nothing method-specific.

* :mod:`.contract` -- :class:`BlockSelector`, the interface a method implements (prefill and decode selection);
* :mod:`.hook` -- the transformers attention function and its per-model :class:`SparseAttentionSession`
  (dense / sliding-window / sparse dispatch, density accounting, state resets);
* :mod:`.block_sparse` -- the kept-block list format, density counting, PyTorch reference attention and the
  backend dispatch to :mod:`.kernels` (Triton block-sparse prefill and decode);
* :mod:`.block_summary` -- per-block key summaries (counts, sums, means, max / min), whole-prompt and running;
* :mod:`.errors` -- :class:`UsageError`.

The core imports neither method (``sketch_walk``'s Sketch&Walk modules, ``seer_attn``) nor the harness
(``eval``); tests/test_structure.py checks it. docs/ARCHITECTURE.md draws the layers.
"""
from .contract import BlockLists, BlockSelector
from .errors import UsageError
from .hook import ATTN_NAME, SparseAttentionSession, attention_modules, enable_sparse_attention

__all__ = ["ATTN_NAME", "BlockLists", "BlockSelector", "SparseAttentionSession", "UsageError", "attention_modules",
           "enable_sparse_attention"]
