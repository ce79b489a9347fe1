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
    """A whitespace word-level fast tokenizer over SPECIAL_TOKENS + `words` (+ the chat markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in SPECIAL_TOKENS + ["USER:", "ASSISTANT:"] + list(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
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
