"""``python -m seer_attn.train_gates``: the gate-distillation command, kept at its documented name.

The command lives with the other harness entry points (eval/ruler/train_gates.py: model loading, corpus,
files); the training step it runs is the library's :mod:`seer_attn.distill`.
"""

if __name__ == "__main__":
    from eval.ruler.train_gates import main

    main()
