"""Model prompt templates, selected by ``--model_template_type``.

``Templates`` holds RULER's fixed templates (NVIDIA/RULER scripts/data/template.py, plus the
``llama-3`` and ``glm-4`` entries of SeerAttention's fork): a string with one ``{task_template}``
slot that wraps the task's prompt. RULER appends the task's answer prefix right after the
wrapped prompt; the prefix is stored as its own field and the server appends it at prediction
time, so the model sees ``template(task) + answer_prefix``.

``chat`` (this project's addition) uses the tokenizer's own chat template instead: the task's
prompt is the user turn, the rendered text ends with the generation prompt (the assistant tag),
and the answer prefix comes after it, in the assistant turn. With SmolLM2 at 1K tokens the
prefix inside the user turn got 0/3 niah answers (the model echoed it), after the assistant tag
3/3. ``chat`` is the default when the tokenizer has a chat template, ``base`` otherwise.

Fixed templates and BOS: prompts are tokenized with no special tokens added (tokenizer.py), so a
fixed template whose hf tokenizer adds a BOS on its own (Gemma, Llama) gets that BOS written at the
start of the text (``<bos>...``), unless the template already starts with it (``meta-llama3``).
RULER's hf server gets the same BOS by tokenizing with special tokens; Gemma-3 degrades without it.
SmolLM2's tokenizer adds none, so its prompts are unchanged.

Few-shot examples (cwe) are earlier turns: with a fixed template RULER concatenates
``template(example) + answer`` lines before ``template(task)``; with ``chat`` they become a
user/assistant exchange before the final user turn.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from sketch_walk.core.errors import UsageError

Templates = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:"
    ),
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "command-r-chat": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{task_template}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    "chatglm-chat": "[gMASK]sop<|user|> \n {task_template}<|assistant|> \n ",
    "RWKV": (
        "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. "
        "Please feel free to ask any question and I will always answer it\n\nUser: {task_template}\n\nAssistant:"
    ),
    "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
    "meta-llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "jamba": "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> {task_template}<|eom|><|bom|><|assistant|>",
    "nemotron5-instruct": "<SPECIAL_10>System\n\n<SPECIAL_11>User\n{task_template}\n<SPECIAL_11>Assistant\n",
    # SeerAttention's fork
    "llama-3": "<|start_header_id|>user<|end_header_id|> {task_template}<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    "glm-4": "[gMASK]<sop><|user|>\n {task_template}<|assistant|>\n",
}

CHAT = "chat"
TEMPLATE_TYPES = sorted(Templates) + [CHAT]

# Some chat templates (Llama 3.2 and later) print today's date unless told one; a fixed date keeps
# the prepared files byte-identical from one day to the next. Templates that ignore it are unaffected.
_CHAT_TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def has_chat_template(tokenizer) -> bool:
    """True when ``tokenizer`` (one of tokenizer.py's wrappers) carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def bos_text(tokenizer) -> str:
    """The BOS token's text when ``tokenizer`` (an hf wrapper) prepends one by default, else ''."""
    hf = getattr(tokenizer, "tokenizer", None)
    bos, bos_id = getattr(hf, "bos_token", None), getattr(hf, "bos_token_id", None)
    if not isinstance(bos, str) or not bos or bos_id is None or not callable(hf):
        return ""
    try:
        ids = hf("a", add_special_tokens=True)["input_ids"]
    except Exception:  # not a transformers tokenizer
        return ""
    return bos if list(ids[:1]) == [bos_id] else ""


def default_template_type(tokenizer) -> str:
    """An embedded model's own choice (``gemma3-270m``, a base model: ``base``), else chat when the
    tokenizer has a chat template, else base."""
    from eval.ruler.model_loader import EMBEDDED_MODELS
    emb = EMBEDDED_MODELS.get(getattr(tokenizer, "name", None) or "")
    if emb is not None and emb.template:
        return emb.template
    return CHAT if has_chat_template(tokenizer) else "base"


class ModelTemplate:
    """Wraps task prompts in a model template; ``render`` gives the text up to the answer prefix."""

    def __init__(self, template_type: str, tokenizer=None):
        if template_type == CHAT:
            if not has_chat_template(tokenizer):
                raise UsageError("--model_template_type chat needs a tokenizer with a chat template (an hf tokenizer "
                                 "of an instruct model); pass --model_template_type base or one of: "
                                 + ", ".join(sorted(Templates)))
        elif template_type not in Templates:
            raise UsageError(f"--model_template_type {template_type} is not a template; choose one of: "
                             + ", ".join(TEMPLATE_TYPES))
        self.template_type = template_type
        self.tokenizer = tokenizer
        self.bos = "" if template_type == CHAT or tokenizer is None else bos_text(tokenizer)

    def render(self, user: str, history: Sequence[Tuple[str, str]] = ()) -> str:
        """The model's input for the user turn ``user`` after the ``(user, assistant)`` turns of ``history``.

        The result ends where the answer prefix begins (after the generation prompt with ``chat``).
        """
        if self.template_type == CHAT:
            messages = []
            for question, answer in history:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer.strip()}]
            messages.append({"role": "user", "content": user})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **_CHAT_TEMPLATE_KWARGS)
        wrap = Templates[self.template_type]
        # str.replace, not str.format: the task text holds the haystack, which may contain braces.
        shots = [wrap.replace("{task_template}", question) + answer for question, answer in history]
        text = "\n".join(shots + [wrap.replace("{task_template}", user)])
        return text if not self.bos or text.startswith(self.bos) else self.bos + text


def select_template(template_type: Optional[str], tokenizer) -> ModelTemplate:
    """``--model_template_type``, or its default for ``tokenizer`` when None."""
    return ModelTemplate(template_type or default_template_type(tokenizer), tokenizer)
