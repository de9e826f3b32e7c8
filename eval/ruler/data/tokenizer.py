"""Tokenizers that measure prompt lengths, selected by ``--tokenizer_type`` (RULER's names).

* ``hf``: a transformers tokenizer. ``--tokenizer_path`` takes anything this project's model
  flags take: the alias ``smollm2`` (the default), a ``.gguf`` file, a local Hugging Face folder or
  a hub name (see eval/ruler/model_loader.py).
* ``nemo`` / ``nemo_tiktoken``: NeMo's SentencePiece / tiktoken tokenizers (``pip install -e
  '.[nemo]'``); ``--tokenizer_path`` is the tokenizer model / vocabulary file.
* ``openai``: tiktoken; ``--tokenizer_path`` is an encoding (``cl100k_base``, the default) or an
  OpenAI model name. tiktoken downloads an encoding's files on first use and caches them.

NeMo and tiktoken are imported only when asked for. Every wrapper counts tokens as the server
tokenizes the prompt: the text as it is, with no special tokens added (an hf tokenizer's BOS is
not prepended; a chat template that wants one writes it into the text itself).
"""
from __future__ import annotations

import os
from typing import List, Optional

from sketch_walk.core.errors import UsageError

TOKENIZER_TYPES = ("hf", "nemo", "nemo_tiktoken", "openai")
DEFAULT_PATHS = {"hf": "smollm2", "openai": "cl100k_base"}


def select_tokenizer(tokenizer_type: str, tokenizer_path: Optional[str]):
    """The tokenizer wrapper for ``--tokenizer_type``/``--tokenizer_path`` (None: the type's default)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UsageError(f"--tokenizer_type {tokenizer_type} is unknown; choose one of: {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_path is None:
        tokenizer_path = DEFAULT_PATHS.get(tokenizer_type)
        if tokenizer_path is None:
            raise UsageError(f"--tokenizer_type {tokenizer_type} needs --tokenizer_path (the tokenizer model file)")
    if tokenizer_type == "hf":
        return HFTokenizer(tokenizer_path)
    if tokenizer_type == "nemo":
        return NeMoSentencePieceTokenizer(tokenizer_path)
    if tokenizer_type == "nemo_tiktoken":
        return NeMoTikTokenTokenizer(tokenizer_path)
    return OpenAITokenizer(tokenizer_path)


class HFTokenizer:
    """A transformers tokenizer, loaded through sketch_walk.model_loader."""

    def __init__(self, model_path: str) -> None:
        from eval.ruler.model_loader import load_tokenizer

        self.name = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.chat_template = getattr(self.tokenizer, "chat_template", None)

    def text_to_tokens(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tokens_to_text(self, tokens: List[int]) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)


def _import_nemo(module: str, cls: str):
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError as exc:
        raise UsageError(f"--tokenizer_type nemo needs nemo-toolkit ({exc.name or exc} is missing); install it with: "
                         f"pip install -e '.[nemo]'  (or use --tokenizer_type hf)") from exc
    return getattr(mod, cls)


def _need_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"--tokenizer_path {path}: no such {what} file")


class NeMoSentencePieceTokenizer:
    """NeMo's SentencePiece tokenizer (``--tokenizer_path`` is the ``tokenizer.model`` file)."""

    chat_template = None

    def __init__(self, model_path: str) -> None:
        _need_file(model_path, "SentencePiece model")
        cls = _import_nemo("nemo.collections.common.tokenizers.sentencepiece_tokenizer", "SentencePieceTokenizer")
        self.name = model_path
        self.tokenizer = cls(model_path=model_path)

    def text_to_tokens(self, text: str) -> List[str]:
        return self.tokenizer.text_to_tokens(text)

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self.tokenizer.tokens_to_text(tokens)


class NeMoTikTokenTokenizer(NeMoSentencePieceTokenizer):
    """NeMo's tiktoken tokenizer (``--tokenizer_path`` is the vocabulary file)."""

    def __init__(self, model_path: str) -> None:
        _need_file(model_path, "tiktoken vocabulary")
        cls = _import_nemo("nemo.collections.common.tokenizers.tiktoken_tokenizer", "TiktokenTokenizer")
        self.name = model_path
        self.tokenizer = cls(vocab_file=model_path)


class OpenAITokenizer:
    """tiktoken (``--tokenizer_path`` is an encoding such as ``cl100k_base`` or a model such as ``gpt-4o``)."""

    chat_template = None

    def __init__(self, model_path: str = "cl100k_base") -> None:
        try:
            import tiktoken
        except ImportError as exc:
            raise UsageError("--tokenizer_type openai needs tiktoken; install it with: pip install tiktoken") from exc
        self.name = model_path
        try:
            try:
                self.tokenizer = tiktoken.get_encoding(model_path)
            except ValueError:
                # not an encoding name: maybe a model name (gpt-4o -> o200k_base)
                try:
                    self.tokenizer = tiktoken.encoding_for_model(model_path)
                except KeyError:
                    raise UsageError(f"--tokenizer_path {model_path} is neither a tiktoken encoding nor an OpenAI "
                                     f"model name (try cl100k_base or o200k_base)") from None
        except UsageError:
            raise
        except Exception as exc:  # the encoding's files download on first use: offline this is where it fails
            detail = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise UsageError(f"tiktoken could not load encoding '{model_path}' ({type(exc).__name__}: {detail}): "
                             f"tiktoken downloads its encodings on first use, which needs network access; run it once "
                             f"online (files are cached in TIKTOKEN_CACHE_DIR) or use --tokenizer_type hf") from exc

    def text_to_tokens(self, text: str) -> List[int]:
        # disallowed_special=(): count special-token text as plain text rather than raising
        return self.tokenizer.encode(text, disallowed_special=())

    def tokens_to_text(self, tokens: List[int]) -> str:
        return self.tokenizer.decode(tokens)
