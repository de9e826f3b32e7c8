"""The method registry (eval/ruler/pred/registry.py): a third method is one module plus one registry line.

The toy method below is that module: a fixed-pattern block selector on the shared core and its ``Server``.
Registering it is the one line; call_api.py then runs it on the CPU end to end (a tiny random Llama: plumbing,
not a result), with its own flag, density in every record and its knobs in the manifest.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from eval.ruler.cli import UsageError
from eval.ruler.pred import call_api, registry
from eval.ruler.pred.servers import Server
from sketch_walk.core import BlockSelector, enable_sparse_attention
from sketch_walk.core.block_sparse import mask_to_block_lists, num_blocks

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the toy method's module
class EveryOtherBlockSelector(BlockSelector):
    """Keeps the sink block, the diagonal and every ``stride``-th block before it: a fixed pattern."""

    name = "fixed_pattern"

    def __init__(self, stride: int, block_size: int = 16):
        self.stride, self.block_size = stride, block_size

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return True

    def _mask(self, rows: torch.Tensor, n_b: int, batch: int, h_kv: int) -> torch.Tensor:
        j = torch.arange(n_b)
        keep = (j == 0) | (j == rows.unsqueeze(-1)) | ((j % self.stride == 0) & (j <= rows.unsqueeze(-1)))
        return keep.expand(batch, h_kv, *keep.shape).contiguous()

    def select_prefill(self, layer_idx, module, query, key):
        n_b = num_blocks(query.shape[2], self.block_size)
        return mask_to_block_lists(self._mask(torch.arange(n_b), n_b, query.shape[0], key.shape[1]))

    def select_decode(self, layer_idx, module, query, key_cache):
        n_b = num_blocks(key_cache.shape[2], self.block_size)
        return mask_to_block_lists(self._mask(torch.tensor(n_b - 1), n_b, query.shape[0], key_cache.shape[1]))

    def describe(self):
        return {"selector": self.name, "stride": self.stride, "block_size": self.block_size}


def _add_flags(group) -> None:
    group.add_argument("--stride", type=int, default=None, help="keep every stride-th block (default 3)")


def _knobs(args: argparse.Namespace, ckpt):
    stride = 3 if args.stride is None else args.stride
    if stride < 1:
        raise UsageError(f"--stride {stride}: must be >= 1")
    return {"stride": stride}


TOY = Server(server_type="FixedPattern", method="fixed_pattern", help="sink + diagonal + every stride-th block",
             add_flags=_add_flags, flags=("stride",), knobs=_knobs,
             enable=lambda model, knobs, ckpt, backend: enable_sparse_attention(
                 model, EveryOtherBlockSelector(knobs["stride"]), backend=backend))


# ------------------------------------------------------------------------------ tests
@pytest.fixture
def toy_registered():
    registry.register(TOY)          # what the one line in registry.SERVERS does for a method of the repository
    try:
        yield TOY
    finally:
        registry.unregister(TOY.server_type)


def _data(folder: Path, n: int = 2) -> None:
    words = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 8
    recs = [{"index": i, "input": f"{words} The magic number {i} is {4000 + i}. {words} What is magic number {i}?",
             "outputs": [str(4000 + i)], "answer_prefix": " Answer:", "length": 0} for i in range(n)]
    (folder / "niah_single_1").mkdir(parents=True)
    (folder / "niah_single_1" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_registered_method_runs_through_call_api(toy_registered, tiny_model, tmp_path):
    _data(tmp_path / "data")
    args = call_api.parse_args(["--data_dir", tmp_path / "data", "--save_dir", tmp_path / "pred", "--task",
                                "niah_single_1", "--model_name_or_path", tiny_model, "--server_type", "fixedpattern",
                                "--stride", "4", "--max_new_tokens", "3", "--no-warmup"])
    plan = call_api.run(args)
    assert plan.server is TOY and plan.manifest_key["knobs"] == {"stride": 4}
    records = [json.loads(line) for line in plan.pred_file.read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        others = rec["others"]
        assert others["method"] == "fixed_pattern" and 1 <= others["new_tokens"] <= 3
        assert 0 < others["density"]["prefill"] < 1          # ~200-token prompts: 13 blocks, a few kept per row
    manifest = json.loads(plan.manifest_file.read_text())
    assert manifest["session"]["stride"] == 4 and manifest["key"]["attn_backend"] == "auto"


def test_a_registered_method_gets_its_flags_and_others_ignore_them(toy_registered, tmp_path, capsys):
    assert "--stride" in call_api.build_parser().format_help()
    _data(tmp_path / "data")
    args = call_api.parse_args(["--data_dir", tmp_path / "data", "--save_dir", tmp_path / "pred", "--task",
                                "niah_single_1", "--server_type", "hf", "--stride", "2"])
    call_api.plan_run(args)
    assert "--server_type hf ignores --stride" in capsys.readouterr().err


def test_unknown_server_type_names_every_registered_one(toy_registered):
    with pytest.raises(UsageError) as exc:
        registry.get("sketch-walks")
    assert all(s in str(exc.value) for s in ("hf", "SketchWalk", "SeerAttn", "FixedPattern"))
    assert registry.get("seer_attn") is registry.get("SeerAttn")       # case, '_' and '-' ignored


def test_registry_tells_checkpoints_apart(tmp_path):
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "config.json").write_text(json.dumps({"method": "sketch_walk", "base_model": "smollm2", "top_k_blocks": 8}))
    assert registry.read_checkpoint(str(sw))["top_k_blocks"] == 8
    seer = tmp_path / "seer"
    seer.mkdir()
    (seer / "config.json").write_text(json.dumps({"method": "seer_attn", "base_model": "x"}))
    with pytest.raises(UsageError, match="missing fields"):        # validated by its method before a model loads
        registry.read_checkpoint(str(seer))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert registry.read_checkpoint(str(hf)) is None and registry.read_checkpoint(str(tmp_path / "none")) is None


def test_registering_twice_is_refused(toy_registered):
    with pytest.raises(ValueError, match="registered already"):
        registry.register(TOY)
