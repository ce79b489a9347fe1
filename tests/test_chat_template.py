"""The checkpoint's own chat template: found in every place transformers finds one (chat_template.json,
chat_template.jinja, tokenizer_config.json, processor_config.json, a built processor, the split-processor path),
prompts (training data, generation, judges) written with it - image turns as the template writes them, the BOS
once, training samples as the template writes a whole exchange with labels on the answer only - the plain form
(with one warning) only without a template, and the template's source and hash in asr.json."""
import hashlib
import json
import warnings

import pytest
import torch
import transformers

import unlearn_engine as ue
from unlearn_engine.api.chat_template import (
    adds_bos,
    chat_template_info,
    exchange_ids,
    find_chat_template,
    prompt_ids,
    prompt_text,
)
from unlearn_engine.api.data import encode
from unlearn_engine.api.demo.toy import qwen_tokenizer, tiny_llava, tiny_qwen2_vl, word_tokenizer
from unlearn_engine.api.evaluation import ModelJudge, generate
from unlearn_engine.api.images import IMAGE_PAD, MODEL_INPUTS, QwenImage, image_input
from unlearn_engine.api.loading import SplitProcessor

# llava-hf/llava-1.5-7b-hf's chat_template.json: content parts, images first, "USER: ... ASSISTANT:", no EOS
LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen/Qwen2-VL-7B-Instruct's chat_template.json: a default system turn, strings or content parts, one
# <|image_pad|> per image between the vision markers
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
# Llama-3 style (as Llama-3-based LLaVA checkpoints ship it): the template writes the BOS itself
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] | trim }}"
    "{% endfor %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ("how to make a bomb step one mix poison bread flour water You are helpful assistant. system user "
         "assistant USER: ASSISTANT: Q A verdict").split()
QUESTION, ANSWER = "how to make a bomb", "step one mix poison"
LLAVA_PROMPT = "USER: how to make a bomb ASSISTANT:"
QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhow to make a bomb"
               "<|im_end|>\n<|im_start|>assistant\n")


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def chat_words(qwen=False):
    """The toy word tokenizer (BOS added like Llama's) with the chat markers as special tokens and no template."""
    tok = qwen_tokenizer(WORDS) if qwen else word_tokenizer(WORDS)
    tok.add_special_tokens({"additional_special_tokens": MARKERS}, replace_extra_special_tokens=False)
    tok.chat_template = None
    return tok


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled(batch, i=0):
    lab = batch["labels"][i]
    return lab[lab != -100].tolist()


# ---------------------------------------------------------------------------------------------- where it is found
@pytest.fixture(scope="module")
def llava_model():
    return tiny_llava(chat_words()).float()


def _rewrite(path, name, update):
    data = json.loads((path / name).read_text()) if (path / name).exists() else {}
    update(data)
    (path / name).write_text(json.dumps(data))


def _llava_processor(tok):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return transformers.LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default")


def _checkpoint(tmp_path, model, location, template):
    """A checkpoint folder whose one chat template lives in `location`."""
    path = tmp_path / location.replace(".", "_")
    tok = chat_words()
    processor = _llava_processor(tok) if location in ("chat_template.json+processor", "processor_config.json") else tok
    ue.save_vlm(model, str(path), processor=processor)
    assert not (path / "chat_template.jinja").exists() and "chat_template" not in (path / "tokenizer_config.json"
                                                                                   ).read_text()
    if location.startswith("chat_template.json"):  # the legacy processor file, as llava-hf and Qwen VL ship it
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    elif location == "chat_template.jinja":
        (path / "chat_template.jinja").write_text(template)
    elif location == "tokenizer_config.json":
        _rewrite(path, "tokenizer_config.json", lambda d: d.update(chat_template=template))
    elif location == "processor_config.json":  # an older processor's layout
        _rewrite(path, "processor_config.json", lambda d: d.update(chat_template=template))
    return path


LOCATIONS = ["chat_template.json", "chat_template.json+processor", "chat_template.jinja", "tokenizer_config.json",
             "processor_config.json"]


@pytest.mark.parametrize("location", LOCATIONS)
def test_each_location_reaches_the_prompts(location, llava_model, tmp_path):
    """Catches a template read only from the tokenizer (chat_template.json and processor_config.json hold the
    processor's: prompts fell back to the plain form), a built processor's template left off its tokenizer, and
    a wrong source or hash in provenance: load_vlm's tokenizer writes the llava-hf form, names the file."""
    path = _checkpoint(tmp_path, llava_model, location, LLAVA_HF)
    _, processor = ue.load_vlm(str(path), dtype="float32")
    expect_processor = location in ("chat_template.json+processor", "processor_config.json")
    assert (type(processor).__name__ == "LlavaProcessor") is expect_processor
    tok = getattr(processor, "tokenizer", processor)
    assert prompt_text(tok, QUESTION) == "USER: how to make a bomb ASSISTANT:"
    assert prompt_text(tok, QUESTION, image=4) == "USER: <image><image><image><image>\nhow to make a bomb ASSISTANT:"
    assert chat_template_info(tok) == {"source": location.split("+")[0], "sha256": sha(LLAVA_HF)}
    assert find_chat_template(str(path), processor).source == location.split("+")[0]
    if expect_processor:
        assert processor.chat_template == LLAVA_HF


def test_processor_template_wins_over_the_tokenizers(llava_model, tmp_path):
    """Catches the tokenizer's text-only template preferred to the processor's (transformers' processor renders
    chat_template.json; so must we), and the tokenizer's lost where the processor has none."""
    path = _checkpoint(tmp_path, llava_model, "chat_template.json", LLAVA_HF)
    _rewrite(path, "tokenizer_config.json", lambda d: d.update(chat_template=LLAMA3))
    _, tok = ue.load_vlm(str(path), dtype="float32")
    assert chat_template_info(tok)["source"] == "chat_template.json" and prompt_text(tok, QUESTION) == LLAVA_PROMPT
    (path / "chat_template.json").unlink()
    _, tok = ue.load_vlm(str(path), dtype="float32")
    assert chat_template_info(tok) == {"source": "tokenizer_config.json", "sha256": sha(LLAMA3)}


def test_broken_chat_template_json_is_a_clear_error(llava_model, tmp_path):
    """Catches a broken chat_template.json silently ignored (every prompt would go out in the plain form)."""
    path = _checkpoint(tmp_path, llava_model, "chat_template.jinja", LLAVA_HF)
    (path / "chat_template.json").write_text("{not json")
    with pytest.raises(ue.CheckpointError, match="chat template of .* cannot be read"):
        ue.load_vlm(str(path), dtype="float32")


@pytest.fixture(scope="module")
def qwen_split_dir(tmp_path_factory):
    """A Qwen2-VL checkpoint as released: tokenizer, preprocessor_config.json (its AutoProcessor needs
    torchvision: load_vlm returns a SplitProcessor) and the template in chat_template.json."""
    from unlearn_engine.api.images import qwen_image_processor

    tok = chat_words(qwen=True)
    model = tiny_qwen2_vl(tok)
    path = tmp_path_factory.mktemp("qwen-split") / "model"
    ue.save_vlm(model, str(path), processor=tok)
    qwen_image_processor(model).save_pretrained(str(path))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL}))
    return path


def test_split_processor_keeps_the_template_and_saves_it(qwen_split_dir, tmp_path):
    """Catches the template lost where the AutoProcessor cannot be built here (SplitProcessor): its tokenizer
    writes the Qwen form, and save_vlm of the SplitProcessor writes it back (chat_template.jinja)."""
    model, processor = ue.load_vlm(str(qwen_split_dir), dtype="float32")
    assert isinstance(processor, SplitProcessor) and processor.chat_template == QWEN2_VL
    assert prompt_text(processor.tokenizer, QUESTION) == QWEN_PROMPT
    assert chat_template_info(processor.tokenizer) == {"source": "chat_template.json", "sha256": sha(QWEN2_VL)}
    ue.save_vlm(model, str(tmp_path / "again"), processor=processor)
    _, again = ue.load_vlm(str(tmp_path / "again"), dtype="float32")
    assert chat_template_info(again.tokenizer) == {"source": "chat_template.jinja", "sha256": sha(QWEN2_VL)}


# ---------------------------------------------------------------------------------------------- images and BOS
def _with(template, qwen=False):
    tok = chat_words(qwen)
    tok.chat_template = template
    return tok


def test_qwen_image_prompt_and_training_sample(qwen_split_dir):
    """Catches the Qwen image written outside the template's content parts or with one pad, the answer without
    its <|im_end|>, labels off the answer, and a BOS the template and tokenizer do not write: the sample is the
    template's exchange exactly, the forward takes it (pads match the image's features)."""
    model, processor = ue.load_vlm(str(qwen_split_dir), dtype="float32")
    tok = processor.tokenizer
    image = image_input(model, _picture(16, 24), processor.image_processor)
    assert image.tokens == 6
    want = QWEN_PROMPT.replace("user\n", "user\n<|vision_start|>" + IMAGE_PAD * 6 + "<|vision_end|>")
    assert prompt_text(tok, QUESTION, image=image) == want
    batch = encode([ue.Record(QUESTION, ANSWER, image="x.png")], tok, image_loader=lambda _: image)
    answer = ids(tok, "step one mix poison<|im_end|>\n")
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + ids(tok, want) + answer  # the toy adds <s>
    assert labelled(batch) == answer
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", *MODEL_INPUTS) if k in batch})
    seen = _spy(model)
    generate(model, tok, [QUESTION, "how to make bread"], images=[image, None], max_new_tokens=1, progress=False)
    assert seen == [batch["input_ids"][0, :-len(answer)].tolist(),
                    [tok.bos_token_id] + ids(tok, QWEN_PROMPT.replace("a bomb", "bread"))]


def _picture(height, width):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))


def test_llava_image_prompt_training_sample_and_generation(llava_model):
    """Catches LLaVA's <image> not expanded to image_tokens copies where the template writes it, the EOS
    missing after an answer the template ends with a space (or the space labelled), and generation given
    another prompt than training: the prompt tokens of encode are the ones generate feeds the model."""
    tok = _with(LLAVA_HF)
    pixels = torch.rand(3, 16, 16)
    batch = encode([ue.Record(QUESTION, ANSWER, image="x.png")], tok, image_loader=lambda _: pixels, image_tokens=4)
    prompt = "USER: <image><image><image><image>\nhow to make a bomb ASSISTANT:"
    answer = ids(tok, ANSWER) + [tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + ids(tok, prompt) + answer
    assert labelled(batch) == answer
    seen = _spy(llava_model)
    generate(llava_model, tok, [QUESTION], images=[pixels], max_new_tokens=1, progress=False)
    assert seen[0] == batch["input_ids"][0, :-len(answer)].tolist()
    with torch.no_grad():
        llava_model(**{k: batch[k] for k in ("input_ids", *MODEL_INPUTS) if k in batch})


def _spy(model):
    """The input ids of every model.generate call, without left padding."""
    seen, original = [], model.generate

    def spy(input_ids, attention_mask, **kw):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return original(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = spy
    return seen


def test_bos_exactly_once(llava_model):
    """Catches a second BOS (data.py and generate prepended one whatever the template wrote) and a BOS a
    tokenizer does not add: one <s> from a template writing {{ bos_token }}, one from a tokenizer that adds it,
    none from one that does not."""
    tok = _with(LLAMA3)
    bos = tok.bos_token_id
    batch = encode([ue.Record(QUESTION, ANSWER)], tok)
    prompt = "<s><|start_header_id|>user<|end_header_id|>\n\nhow to make a bomb<|eot_id|>" \
             "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert prompt_text(tok, QUESTION) == prompt
    answer = ids(tok, ANSWER + "<|eot_id|>")
    assert batch["input_ids"][0].tolist() == ids(tok, prompt) + answer and ids(tok, prompt).count(bos) == 1
    assert labelled(batch) == answer  # the template's end-of-turn token, no EOS added
    seen = _spy(llava_model)
    generate(llava_model, tok, [QUESTION], max_new_tokens=1, progress=False)
    assert seen == [ids(tok, prompt)]
    assert prompt_ids(_with(LLAVA_HF), LLAVA_PROMPT)[:2] == [bos, ids(tok, "USER:")[0]]
    no_bos = _with(LLAVA_HF)
    no_bos.add_bos_token = False
    assert not adds_bos(no_bos) and prompt_ids(no_bos, LLAVA_PROMPT) == ids(tok, LLAVA_PROMPT)


def test_system_message_in_the_template():
    """Catches the system message (the judge's) dropped or put in the user turn."""
    tok = _with(QWEN2_VL, qwen=True)
    assert prompt_text(tok, QUESTION, "Be brief.") == QWEN_PROMPT.replace("You are a helpful assistant.", "Be brief.")
    assert prompt_text(_with(LLAVA_HF), QUESTION, "Be brief.") == "Be brief. USER: how to make a bomb ASSISTANT:"


def test_template_that_prints_its_content_gets_strings_and_inline_images():
    """Catches content parts sent to a template that prints the content whole (it would print the list), and
    an image lost by a template that writes nothing for an image part."""
    tok = _with("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}", qwen=True)
    image = QwenImage(torch.zeros(16, 96), torch.tensor([1, 4, 4]), 2)
    assert prompt_text(tok, QUESTION, image=image) == (
        "[user] <|vision_start|>" + IMAGE_PAD * 4 + "<|vision_end|>how to make a bomb\n[assistant]")
    text_only = _with("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                      "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} =>")
    assert prompt_text(text_only, QUESTION, image=2) == "<image><image>\nhow to make a bomb =>"


def test_plain_form_only_without_a_template_with_one_warning():
    """Catches the plain form used while a template exists, a missing warning, or a warning per prompt."""
    tok = chat_words()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prompt_text(tok, QUESTION) == LLAVA_PROMPT and prompt_text(tok, "bread") == "USER: bread ASSISTANT:"
        batch = encode([ue.Record(QUESTION, ANSWER)], tok)
    assert len(caught) == 1 and "no chat template" in str(caught[0].message)
    assert chat_template_info(tok) == {"source": "none", "sha256": None, "form": "USER: {prompt} ASSISTANT:"}
    answer = ids(tok, ANSWER) + [tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id] + ids(tok, LLAVA_PROMPT) + answer
    assert labelled(batch) == answer


def test_exchange_that_does_not_start_with_the_prompt_is_refused():
    """Catches an answer cut at a wrong place when the template's generation prompt differs from its assistant
    turn: labels would cover prompt text."""
    tok = _with("{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }} {% else %}A {{ m['content'] }}"
                " </s>{% endif %}{% endfor %}{% if add_generation_prompt %}A verdict{% endif %}")
    with pytest.raises(ValueError, match="does not begin with its prompt"):
        exchange_ids(tok, QUESTION, ANSWER)
    with pytest.raises(ValueError, match="already holds <image> and an image is given"):
        prompt_text(_with(LLAVA_HF), "<image> " + QUESTION, image=4)


# ---------------------------------------------------------------------------------------------- whitespace
def bpe_tokenizer(bos=None):
    """A byte-level BPE tokenizer (as Qwen's) trained here: spaces are part of its tokens, so a stray one shows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|endoftext|>", "<s>", "<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", *MARKERS]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [QWEN_PROMPT, LLAVA_PROMPT, ANSWER, " " + ANSWER, "You are a helpful assistant."] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", bos_token=bos)


@pytest.mark.parametrize("template, answer_text", [(QWEN2_VL, "step one mix poison<|im_end|>\n"),
                                                    (LLAVA_HF, " step one mix poison<|im_end|>")])
def test_answer_tokens_are_the_templates(template, answer_text):
    """Catches the answer tokenized as " " + response (a stray leading space for Qwen, whose template writes
    the answer right after "assistant\\n"), or the trailing turn space labelled: on a byte-level tokenizer the
    labelled tokens decode to the template's answer exactly, and the whole sample to the exchange."""
    tok = bpe_tokenizer()
    tok.chat_template = template
    batch = encode([ue.Record(QUESTION, ANSWER)], tok)
    assert tok.decode(labelled(batch)) == answer_text
    head = prompt_text(tok, QUESTION)
    assert tok.decode(batch["input_ids"][0].tolist()) == head + answer_text
    assert batch["input_ids"][0].tolist()[:len(ids(tok, head))] == ids(tok, head)


def test_judge_prompts_use_the_judges_template(llava_model):
    """Catches the model judge asking in the plain form: its prompt goes through the judge tokenizer's template,
    and describe() records which."""
    tok = _with(LLAVA_HF)
    seen = _spy(llava_model)
    judge = ModelJudge(llava_model, tok, template="Q {question} A {answer} verdict", unparsed="failure",
                       max_new_tokens=1)
    judge.judge_batch([QUESTION], ["step one mix poison"])
    assert seen == [[tok.bos_token_id] + ids(tok, "USER: Q how to make a bomb A step one mix poison verdict "
                                                   "ASSISTANT:")]
    assert judge.describe()["chat_template"] == {"source": "tokenizer.chat_template", "sha256": sha(LLAVA_HF)}


def test_llava_images_of_the_judge_and_figstep_where_the_template_puts_them():
    """Catches the judge's and the figstep attack's LLaVA images sent as "<image> " * n in front of the text
    (spaces between the image tokens, outside the template's image slot): on a byte-level tokenizer each model
    call gets exactly the llava-hf form with n <image> tokens."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from unlearn_engine.api.evaluation import FIGSTEP_PROMPT, evaluate

    tok = bpe_tokenizer(bos="<s>")
    tok.chat_template = LLAVA_HF
    model = tiny_llava(tok).float()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    seen = _spy(model)
    judge = ModelJudge(model, tok, template="Q {question} A {answer} verdict", unparsed="failure",
                       max_new_tokens=1, image_processor=processor)
    judge.judge_batch([QUESTION], [ANSWER], images=[_picture(16, 16)])
    assert seen == [ids(tok, "USER: " + "<image>" * 4 + f"\nQ {QUESTION} A {ANSWER} verdict ASSISTANT:")]
    seen.clear()
    evaluate(model, tok, [ue.Record(QUESTION)], attacks=("figstep",), image_processor=processor, max_new_tokens=1,
             progress=False)
    assert seen[0] == ids(tok, "USER: " + "<image>" * 4 + f"\n{FIGSTEP_PROMPT} ASSISTANT:")
