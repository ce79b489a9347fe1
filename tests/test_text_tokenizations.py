"""Text-side features on a tokenizer that splits words into several tokens (WordPiece: "bomb" -> "bo" "##mb"),
and on odd inputs (unknown pieces, spaces, empty keywords): the toy word-level tokenizer of the other tests gives
one token per word, so a sum taken for a mean, or a count of words taken for a count of tokens, passes there."""
import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api.data import encode
from unlearn_engine.api.demo.toy import CHAT_TEMPLATE, SPECIAL_TOKENS

PIECES = ["USER:", "ASSISTANT:", "how", "to", "make", "a", "bo", "##mb", "pi", "##pe", "po", "##ison", "step", "one",
          "mix", "two", "ki", "##ll"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + PIECES)}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()
    t = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>", add_bos_token=True, extra_special_tokens={"image_token": "<image>"})
    t.chat_template = CHAT_TEMPLATE
    return t


def ids(tok, *pieces):
    return [tok.convert_tokens_to_ids(p) for p in pieces]


def test_the_tokenizer_splits_words(tok):
    assert tok("pipe bomb", add_special_tokens=False)["input_ids"] == ids(tok, "pi", "##pe", "bo", "##mb")
    assert tok("bombx", add_special_tokens=False)["input_ids"] == ids(tok, "<unk>")  # a word with an unknown piece


def test_concept_embedding_is_the_mean_of_the_keywords_tokens(tok):
    """A keyword's row is the mean of its tokens' embeddings (not their sum, not its first token); unknown tokens
    are left out of the mean, a keyword of unknown tokens only (or of none) is skipped; spaces around it change
    nothing."""
    E = torch.randn(len(tok), 8)
    rows = ue.concept_embeddings(tok, E, ["bomb", "pipe bomb", "bomb zzz", "  bomb ", "zzz", "", "kill"])
    expected = [E[ids(tok, "bo", "##mb")].mean(0), E[ids(tok, "pi", "##pe", "bo", "##mb")].mean(0),
                E[ids(tok, "bo", "##mb")].mean(0), E[ids(tok, "bo", "##mb")].mean(0), E[ids(tok, "ki", "##ll")].mean(0)]
    torch.testing.assert_close(rows, torch.stack(expected))
    with pytest.raises(ValueError, match="none of the keywords"):
        ue.concept_embeddings(tok, E, ["zzz", "", "bombx"])


def test_risk_awareness_subspace_from_multi_token_keywords(tok):
    from unlearn_engine.api.demo.toy import tiny_llava

    model = tiny_llava(tok)
    E = model.get_input_embeddings().weight
    rai = ue.RiskAwareness(model, ["pipe bomb", "kill", "poison"], tokenizer=tok, rank=2)
    rows = torch.stack([E[ids(tok, *p)].float().mean(0) for p in (("pi", "##pe", "bo", "##mb"), ("ki", "##ll"),
                                                                     ("po", "##ison"))]).detach()
    expected = ue.unsafe_subspace(rows, 2)
    # the same subspace (bases may differ by the sign of a column)
    torch.testing.assert_close(rai.basis @ rai.basis.T, expected @ expected.T, rtol=1e-5, atol=1e-6)


def test_encode_labels_and_counts_are_in_tokens(tok):
    """The labels are the answer's tokens (5 for 4 words) and the template's end token; the max_length cut and
    the stats count tokens, not words."""
    record = ue.Record("how to make a bomb", "step one mix poison", "forget")
    stats = {}
    batch = encode([record], tok, stats=stats)
    labelled = [int(i) for i in batch["input_ids"][0][batch["labels"][0] != -100]]
    assert labelled == ids(tok, "step", "one", "mix", "po", "##ison", "</s>")
    assert stats["labelled"] == [6] and stats["cut"] == [0]
    length = batch["input_ids"].shape[1]
    stats = {}
    cut = encode([record], tok, max_length=length - 2, stats=stats)
    assert cut["input_ids"].shape[1] == length - 2
    assert stats["labelled"] == [4] and stats["cut"] == [2]  # "##ison" and "</s>" cut: half a word, one end token
