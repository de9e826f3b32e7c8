"""The contract between a block-selection method and the shared sparse-attention hook.

A method (Sketch&Walk, the oracle and local controls, SeerAttention's gate) is a
:class:`BlockSelector`. The hook (:mod:`sketch_walk.core.hook`) owns everything else: which
attention runs (dense, the block-sparse kernel, prefill or decode), density accounting, and
when state is reset. So methods differ only in how they pick blocks.

Shapes: ``query`` (B, H, q_len, d) and ``key`` (B, H_kv, k_len, d) AFTER RoPE, exactly what the
transformers attention interface passes (keys not repeated for GQA). Selections are kept-block
lists in the format of :mod:`sketch_walk.core.block_sparse`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

BlockLists = Tuple[torch.Tensor, torch.Tensor]   # (block_idx int32, block_cnt int32)


def check_decode_step(method: str, layer_idx: int, held: Optional[int], n_keys: int, state: str,
                      missing_hint: str) -> None:
    """A decode call must follow the prefill and add exactly one key to what the method summarised.

    ``held``: keys summarised in the method's per-layer ``state`` before this call (None: no state);
    ``n_keys``: the KV cache length, the new token included. Raises RuntimeError otherwise.
    """
    if held is None:
        raise RuntimeError(f"{method} layer {layer_idx}: decode before prefill (no {state}); {missing_hint}")
    if held != n_keys - 1:
        raise RuntimeError(f"{method} layer {layer_idx}: {state} holds {held} keys, the KV cache {n_keys - 1} "
                           f"before this token; one token per decode step is required")


class BlockSelector:
    """Base class of block-selection methods. One instance per model; per-sequence state inside."""

    name: str = "base"
    block_size: int = 64
    #: whether the hook may run a left-padded batch through this selector: it then selects for each sequence alone, on
    #: that sequence's own tokens, with that sequence's own state (:meth:`row_state`; :mod:`sketch_walk.core.hook`,
    #: "Padded batches"). False: padded batches are refused (equal-length batches still run as one)
    padded_batches: bool = False
    #: names of the attributes holding the per-sequence state (everything :meth:`reset` replaces), which the hook swaps
    #: in and out between the sequences of a padded batch
    row_state_attrs: Tuple[str, ...] = ()

    def attach(self, model) -> None:
        """Called once when the hook is enabled on ``model`` (e.g. to register forward hooks)."""

    def detach(self) -> None:
        """Undo :meth:`attach`."""

    def reset(self, batch_size: int) -> None:
        """Forget all per-sequence state: called before every new prompt (batch)."""

    def row_state(self) -> Dict[str, Any]:
        """The per-sequence state (the attributes :attr:`row_state_attrs` names), for :meth:`set_row_state`."""
        return {a: getattr(self, a) for a in self.row_state_attrs}

    def set_row_state(self, state: Dict[str, Any]) -> None:
        """Make ``state`` (from :meth:`row_state`) the current per-sequence state."""
        for a, v in state.items():
            setattr(self, a, v)

    def focus_row(self, row: Optional[int], rows: int) -> None:
        """Padded batches: the next ``select_*`` calls are for batch row ``row`` alone (of ``rows``), and the query and
        key they get are that sequence's own tokens (batch 1); ``None``: the whole batch again. A selector that reads
        other tensors of the call (SeerAttn's pre-RoPE q and k) takes that row's part of them."""

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """False for layers that stay dense (e.g. the first ``dense_layers``)."""
        raise NotImplementedError

    def select_prefill(self, layer_idx: int, module, query: torch.Tensor, key: torch.Tensor) -> BlockLists:
        """Kept blocks for every query block: block_idx (B, H_kv, n_b, max_kept), block_cnt (B, H_kv, n_b)."""
        raise NotImplementedError

    def select_decode(self, layer_idx: int, module, query: torch.Tensor, key_cache: torch.Tensor) -> BlockLists:
        """Kept cache blocks for one new query: block_idx (B, H_kv, max_kept), block_cnt (B, H_kv).

        ``key_cache`` (B, H_kv, N, d) holds every key so far, the new token's (position N-1) included.
        Implementations update running per-block summaries from ``key_cache[:, :, -1]`` only.
        """
        raise NotImplementedError

    # -- static-cache decode (CUDA graphs: sketch_walk.core.static_decode) ----------------------------------------------
    def static_decode_support(self) -> Optional[str]:
        """None when :meth:`select_decode_static` covers this configuration, else why not (the hook then decodes on the
        dynamic cache, eagerly)."""
        return "no static-cache decode for this method"

    def prepare_static_decode(self, capacity_tokens: int) -> None:
        """After the prefill, before the first :meth:`select_decode_static`: make every per-layer state hold
        ``capacity_tokens`` tokens (no allocation, growth or block opening may happen in a step)."""

    def select_decode_static(self, layer_idx: int, module, query: torch.Tensor, k_new: torch.Tensor,
                             n_blocks: int, key_cache: Optional[torch.Tensor] = None,
                             n_keys: Optional[torch.Tensor] = None) -> BlockLists:
        """:meth:`select_decode` for a step that may be captured in a CUDA graph and replayed for every token of the
        block: ``k_new`` (B, H_kv, d) the new key, ``n_blocks`` the blocks so far (the new token's included: host
        constant while a graph serves the block); ``key_cache`` (B, H_kv, n_blocks * block_size, d) the static
        buffer up to the block's end and ``n_keys`` its length (a device scalar), for methods that read keys.
        Fixed shapes, state updated in place on the device, no host sync, no host-side counter
        (:meth:`finish_static_decode` sets those)."""
        raise NotImplementedError

    def finish_static_decode(self, n_keys: int) -> None:
        """After the static steps: host-side counters to ``n_keys`` keys summarised."""

    def describe(self) -> Dict[str, Any]:
        """Every knob, for run manifests and result files."""
        return {"selector": self.name, "block_size": self.block_size}
