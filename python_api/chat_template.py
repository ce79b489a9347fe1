"""The checkpoint's own chat template: found where transformers finds it, and every prompt written with it.

Where (find_chat_template, which load_vlm calls): the processor's template as transformers' processor loading
reads it (ProcessorMixin.get_processor_dict: processor_config.json's "chat_template", else chat_template.json,
else chat_template.jinja), else the tokenizer's (chat_template.jinja, else tokenizer_config.json's
"chat_template"). The template found is put on the tokenizer (and on a built processor without one), so a
checkpoint whose AutoProcessor cannot be built here (loading.SplitProcessor) keeps it too; its file and the
sha256 of its text go into provenance (chat_template_info).

How (prompt_text, prompt_ids, exchange_ids):
- Messages are rendered by the tokenizer's apply_chat_template. A template that reads content parts (the
  llava-hf and Qwen VL ones) gets [{"type": "image"}, {"type": "text", ...}]; one that prints its content
  gets strings. The image part the template writes is expanded to the image's tokens: Qwen's
  <|vision_start|><|image_pad|><|vision_end|> to the image's own number of pads (images.QwenImage), LLaVA's
  <image> to image_tokens(model) copies. A template that writes nothing for an image part gets the image's
  tokens in front of the text.
- The BOS token exactly once: none added when the rendered text starts with it (a template that writes
  {{ bos_token }}), else the tokenizer's own (when its add_special_tokens would put one first).
- A training sample is the template's whole user/assistant exchange: the prompt is the render of the user turn
  with the generation prompt (what generation is given, token for token), the answer is the rest (with the
  template's end-of-turn token), and only the answer is labelled. A template that writes no special token
  after the answer (llava-hf's ends it with a space) gets the EOS in place of that trailing whitespace, as
  LLaVA's own training writes "ASSISTANT: answer</s>".
- A tokenizer without a template: the plain form "[SYSTEM ]USER: prompt ASSISTANT:" (+ " answer" and the EOS),
  with a one-line warning per tokenizer.
"""
import hashlib
import json
import os
import warnings
import weakref
from typing import List, NamedTuple, Tuple

from unlearn_engine.api.images import IMAGE_PAD, QwenImage

IMAGE_MARK = "<image>"  # the LLaVA image token, as the llava-hf template writes an image part
PLAIN_FORM = "USER: {prompt} ASSISTANT:"
_PROBE_TEXT, _PROBE_KEY = "ue-probe-text-5d1c", "ue-probe-key-9a27"


class ChatTemplate(NamedTuple):
    text: str     # the template (the default one, when a checkpoint names several)
    source: str   # the file it was read from: chat_template.json, chat_template.jinja, tokenizer_config.json, ...
    sha256: str   # of text (UTF-8)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _default(template) -> str | None:
    """The template transformers renders when no name is asked for: the string, or a dict's "default"."""
    if isinstance(template, dict):
        return template.get("default")
    if isinstance(template, (list, tuple)):  # tokenizer_config.json's [{name, template}, ...]
        return next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template or None


def _read(path: str, name: str, key: str | None = None):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        return None
    with open(full, encoding="utf-8") as f:
        text = f.read()
    if key is None:
        return text
    try:
        return _default(json.loads(text).get(key))
    except (json.JSONDecodeError, AttributeError):
        return None


def _source(path: str, text: str, kind: str) -> str:
    """The file `text` came from, looked up in transformers' order for `kind` ("processor" or "tokenizer"); the
    kind itself when no file holds it (a template set in code)."""
    files = [("processor_config.json", "chat_template"), ("chat_template.json", "chat_template"),
             ("chat_template.jinja", None)] if kind == "processor" else []
    files += [("chat_template.jinja", None), ("tokenizer_config.json", "chat_template")]
    return next((name for name, key in files if _read(path, name, key) == text), kind)


def find_chat_template(path: str, processor=None) -> ChatTemplate | None:
    """The chat template of the checkpoint folder `path`, as transformers would find it: a processor's (from
    `processor` when it is a built transformers processor, else read by transformers' own processor loading,
    which needs no sub-processor), else the tokenizer's (`processor` itself or its .tokenizer). None when there
    is none. ValueError naming the file when a template file is unreadable."""
    from transformers.processing_utils import ProcessorMixin

    if isinstance(processor, ProcessorMixin):
        template = _default(processor.chat_template)
    else:
        try:
            template = _default(ProcessorMixin.get_processor_dict(path, local_files_only=True)[0].get("chat_template"))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"the chat template of {path} cannot be read: {' '.join(str(err).split())}") from None
    kind = "processor"
    if template is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        template, kind = _default(getattr(tokenizer, "chat_template", None)), "tokenizer"
    if template is None:
        return None
    return ChatTemplate(template, _source(path, template, kind), _sha256(template))


def attach_chat_template(processor, template: ChatTemplate | None) -> None:
    """Put `template` on the tokenizer of `processor` (the processor itself when it is a tokenizer), and on a
    built processor that has none, recording its source for chat_template_info. Nothing for None."""
    if template is None:
        return
    tokenizer = getattr(processor, "tokenizer", processor)
    own = getattr(tokenizer, "chat_template", None)
    if _default(own) != template.text:
        tokenizer.chat_template = dict(own, default=template.text) if isinstance(own, dict) else template.text
    if tokenizer is not processor and hasattr(processor, "chat_template") and processor.chat_template is None:
        processor.chat_template = template.text
    tokenizer._ue_chat_template = template


def chat_template_info(tokenizer) -> dict:
    """What prompts are written with, for provenance: {"source", "sha256"} of the template (source: the file it
    was loaded from, or "tokenizer.chat_template" when it was set in code), or source "none" and sha256 None
    with "form" the plain form when the tokenizer has no template."""
    text = _default(getattr(tokenizer, "chat_template", None))
    if text is None:
        return {"source": "none", "sha256": None, "form": PLAIN_FORM}
    sha = _sha256(text)
    loaded = getattr(tokenizer, "_ue_chat_template", None)
    return {"source": loaded.source if loaded is not None and loaded.sha256 == sha else "tokenizer.chat_template",
            "sha256": sha}


# ---------------------------------------------------------------------------------------------- rendering
_FORMS: dict = {}  # template sha256 -> whether it reads content parts
_warned: "weakref.WeakSet" = weakref.WeakSet()
_warned_ids: set = set()  # tokenizers that cannot be weakly referenced


def _warn_plain(tokenizer) -> None:
    try:
        if tokenizer in _warned:
            return
        _warned.add(tokenizer)
    except TypeError:
        if id(tokenizer) in _warned_ids:
            return
        _warned_ids.add(id(tokenizer))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    warnings.warn(f"{name} has no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json): "
                  f"prompts are written in the plain form {PLAIN_FORM!r}", UserWarning, stacklevel=3)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _reads_parts(tokenizer, template: str) -> bool:
    """Whether the template renders content parts (the text of a text part, not the part printed whole)."""
    key = _sha256(template)
    if key not in _FORMS:
        part = {"type": "text", "text": _PROBE_TEXT, "probe": _PROBE_KEY}
        try:
            out = _render(tokenizer, [{"role": "user", "content": [part]}], True)
            _FORMS[key] = _PROBE_TEXT in out and _PROBE_KEY not in out
        except Exception:  # noqa: BLE001 -- a template that fails on parts reads strings
            _FORMS[key] = False
    return _FORMS[key]


def _marker(image) -> str:
    return IMAGE_PAD if isinstance(image, QwenImage) else IMAGE_MARK


def _expanded(image) -> str:
    """The image's tokens where the template wrote its one marker."""
    return IMAGE_PAD * image.tokens if isinstance(image, QwenImage) else IMAGE_MARK * image


def _inline(image) -> str:
    """The image's tokens in front of the text, for a template (or the plain form) that places no image."""
    return image.text() if isinstance(image, QwenImage) else IMAGE_MARK * image + "\n"


def _check_image(image) -> None:
    if image is not None and not isinstance(image, QwenImage) and (isinstance(image, bool) or not isinstance(
            image, int) or image < 1):
        raise ValueError(f"image must be None, an images.QwenImage or a positive number of {IMAGE_MARK} tokens, "
                         f"got {image!r}")


def _chat(tokenizer, template, prompt, system, image, response) -> str:
    """The template's render of [system?, user(image?, prompt), assistant(response)?], with the image expanded."""
    parts = _reads_parts(tokenizer, template)

    def render(inline: bool) -> str:
        def message(role, text, shown=None):
            if shown is not None and inline:
                text, shown = _inline(shown) + text, None
            if not parts:
                return {"role": role, "content": text}
            return {"role": role, "content": ([{"type": "image"}] if shown is not None else [])
                    + [{"type": "text", "text": text}]}

        messages = ([message("system", system)] if system is not None else []) + [message("user", prompt, image)]
        if response is not None:
            messages.append(message("assistant", response))
        return _render(tokenizer, messages, response is None)

    if image is not None and _marker(image) in prompt + (system or "") + (response or ""):
        raise ValueError(f"the prompt already holds {_marker(image)} and an image is given: pass the image only")
    if image is None or not parts:
        return render(inline=True)
    marker = _marker(image)
    out = render(inline=False)
    emitted = out.count(marker)
    if emitted == 0:  # the template writes nothing for an image part: the image's tokens go before the text
        return render(inline=True)
    if emitted != 1:
        raise ValueError(f"the chat template writes {emitted} {marker} for one image part (expected 1)")
    return out.replace(marker, _expanded(image))


def prompt_text(tokenizer, prompt: str, system: str | None = None, *, image=None) -> str:
    """The prompt as the model sees it, up to where its answer begins (no BOS unless the template writes it): the
    tokenizer's chat template with the generation prompt (a system message when `system` is given), else the
    plain form "[SYSTEM ]USER: prompt ASSISTANT:" (with a one-line warning). image: None, an images.QwenImage,
    or the number of LLaVA <image> tokens one image takes (data.image_tokens(model)); written where the
    template places an image (module docstring)."""
    _check_image(image)
    template = _default(getattr(tokenizer, "chat_template", None))
    if template is not None:
        return _chat(tokenizer, template, prompt, system, image, None)
    _warn_plain(tokenizer)
    text = (_inline(image) if image is not None else "") + prompt
    return (f"{system} " if system is not None else "") + PLAIN_FORM.format(prompt=text)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when asked to add special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _bos(tokenizer, text: str) -> List[int]:
    bos_token = getattr(tokenizer, "bos_token", None)
    if bos_token and text.startswith(bos_token):
        return []  # the template wrote it
    return [tokenizer.bos_token_id] if adds_bos(tokenizer) else []


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, text: str) -> List[int]:
    """A prompt_text as token ids, with the BOS token exactly once (module docstring)."""
    return _bos(tokenizer, text) + _ids(tokenizer, text)


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, t in decoder.items() if getattr(t, "special", False)}


def exchange_ids(tokenizer, prompt: str, response: str, *, image=None) -> Tuple[List[int], List[int]]:
    """(prompt ids, answer ids) of one training sample: prompt ids exactly as prompt_ids(prompt_text(...)) gives
    them to generation (BOS once), answer ids the rest of the template's user/assistant exchange (module
    docstring); in the plain form " response" and the EOS."""
    head = prompt_text(tokenizer, prompt, image=image)
    head_ids = _ids(tokenizer, head)
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    template = _default(getattr(tokenizer, "chat_template", None))
    if template is None:
        tail, end = (" " + response if response else ""), eos
    else:
        whole = _chat(tokenizer, template, prompt, None, image, response)
        if not whole.startswith(head):
            raise ValueError(f"the chat template ({chat_template_info(tokenizer)['source']}) writes a user/assistant "
                             "exchange that does not begin with its prompt (the user turn with the generation prompt): "
                             f"the answer cannot be told apart; prompt {head!r}, exchange {whole!r}")
        tail, end = whole[len(head):], []
        if not set(_ids(tokenizer, tail)) & _special_ids(tokenizer):  # no end-of-turn token: the EOS ends it
            tail, end = tail.rstrip(), eos
    whole_ids = _ids(tokenizer, head + tail)
    # the answer as the whole exchange tokenizes (a word's leading space stays in its token), unless a token
    # spans the prompt's end: then the answer alone, so that the prompt stays what generation is given
    answer = whole_ids[len(head_ids):] if whole_ids[:len(head_ids)] == head_ids else _ids(tokenizer, tail)
    return _bos(tokenizer, head) + head_ids, answer + end
