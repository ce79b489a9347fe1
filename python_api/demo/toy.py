"""Tiny models and tokenizers built locally from transformers configs (no downloads): for tests, the
demo world and benchmarks of the high-level API."""
from typing import Iterable

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def word_tokenizer(words: Iterable[str]):
    """A whitespace word-level fast tokenizer over SPECIAL_TOKENS + `words` (+ the chat markers), with the toy chat
    template CHAT_TEMPLATE; it adds <s> (and only <s>) when asked for special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in SPECIAL_TOKENS + ["USER:", "ASSISTANT:"] + list(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # add_bos_token: like a Llama tokenizer, it puts <s> first when asked for special tokens
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", add_bos_token=True, extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llava(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4, image_size: int = 16,
               patch: int = 8, seed: int | None = 0, tie_word_embeddings: bool = False):
    """A LlavaForConditionalGeneration small enough to train on a CPU in seconds."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if seed is not None:
        torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config).eval()


def train_nll(model, tokenizer, records, *, steps: int = 60, lr: float = 3e-3, batch_size: int = 8, seed: int = 0,
              image_loader=None, progress: bool = False):
    """Plain supervised training (response NLL through the fused loss): makes a tiny model know `records`
    (records with images need image_loader, see unlearn_engine.api.data.encode)."""
    from tqdm.auto import tqdm

    from unlearn_engine.api.data import encode, image_tokens
    from unlearn_engine.api.trainer import trainer_loss
    from unlearn_engine.roles import RETAIN

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in tqdm(range(steps), desc="train", disable=not progress, leave=False):
        idx = torch.randperm(len(records), generator=g)[:batch_size].tolist()
        batch = encode([records[i] for i in idx], tokenizer, image_loader=image_loader,
                       image_tokens=image_tokens(model) if image_loader else 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["roles"] = torch.full((len(idx),), RETAIN, device=device)  # every sample learned
        loss = trainer_loss(model, batch, retain="nll")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def qwen_tokenizer(words: Iterable[str]):
    """word_tokenizer with the Qwen-VL vision markers (<|vision_start|> <|image_pad|> <|vision_end|>) as special
    tokens: what a Qwen2VLProcessor expects of its tokenizer."""
    from tokenizers import AddedToken

    tok = word_tokenizer(QWEN_VISION_TOKENS + list(words))
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN_VISION_TOKENS]})
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    tok.vision_start_token, tok.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    return tok


def tiny_qwen2_vl(tokenizer, *, version: str = "2", hidden: int = 32, layers: int = 2, heads: int = 4,
                  patch: int = 4, seed: int | None = 0, tie_word_embeddings: bool = False):
    """A Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5") small
    enough to train on a CPU in seconds: one vision block, 2x2 patch merging, M-RoPE sections summing to
    head_dim / 2. `tokenizer` must hold the Qwen vision markers (qwen_tokenizer)."""
    import transformers

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    if seed is not None:
        torch.manual_seed(seed)
    head_dim = hidden // heads
    section = [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]
    vision = dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3, in_channels=3, mlp_ratio=2, intermediate_size=32,
                  out_hidden_size=hidden, fullatt_block_indexes=[0], window_size=4 * patch)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
                tie_word_embeddings=tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    cfg_cls, model_cls = ((transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration) if version == "2"
                          else (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration))
    config = cfg_cls(vision_config=vision, text_config=text, tie_word_embeddings=tie_word_embeddings, **ids)
    return model_cls(config).eval()

