"""Write a SketchWalk checkpoint folder: ``python -m sketch_walk.checkpoint`` (this file, run by that name).

Sketch&Walk is training-free, so a checkpoint is a config.json naming the base model and every knob
(:mod:`sketch_walk.checkpoint`); the seed's ``--model_path ./checkpoints/sketchwalk_llama`` is such a folder::

    python -m sketch_walk.checkpoint --output ./checkpoints/sketchwalk_llama --base_model smollm2 [--top_k_blocks 8 ...]
"""
from __future__ import annotations

import sys

from eval.ruler.cli import OneLineParser, cli_main
from sketch_walk.checkpoint import write_sketchwalk_checkpoint
from sketch_walk.config import SketchWalkConfig, add_arguments


@cli_main
def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m sketch_walk.checkpoint",
                           description="Write a SketchWalk checkpoint folder (config.json: base model and every "
                                       "Sketch&Walk knob).")
    parser.add_argument("--output", required=True, help="checkpoint folder to write (created)")
    parser.add_argument("--base_model", default="smollm2",
                        help="base model: alias smollm2, a .gguf file, a model folder or a hub name (default smollm2)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = SketchWalkConfig.from_namespace(args)
    path = write_sketchwalk_checkpoint(args.output, args.base_model, config)
    print(f"wrote {path} (base_model {args.base_model}; "
          + ", ".join(f"{k} {v}" for k, v in config.to_dict().items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
