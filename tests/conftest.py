import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


def assert_masked_steps_match_torch(params, mask, algorithm, make_grad, *, compact, rtol, steps=2):
    """ue.MaskedOptimizer on copies of `params` against torch.optim (AdamW or SGD, same hyper-parameters) with the
    unselected elements restored after each step (reference.masked_step_reference): equal after every step.
    make_grad(p) gives a fresh gradient like p."""
    import unlearn_engine as ue
    from unlearn_engine.reference import masked_step_reference

    dense = [mask.dense(i) for i in range(len(params))]
    kw = dict(lr=0.01, weight_decay=0.1) if algorithm == "adamw" else dict(lr=0.05, momentum=0.9, weight_decay=0.0)
    make = torch.optim.AdamW if algorithm == "adamw" else torch.optim.SGD
    ref, ours = [p.clone().requires_grad_() for p in params], [p.clone() for p in params]
    torch_opt = make(ref, foreach=False, **kw)
    opt = ue.MaskedOptimizer(ours, mask, algorithm=algorithm, compact_state=compact, **kw)
    for _ in range(steps):
        grads = [make_grad(p) for p in params]
        for r, o, gr in zip(ref, ours, grads):
            r.grad, o.grad = gr.clone(), gr.clone()
        opt.step()
        masked_step_reference(torch_opt, ref, dense)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r.detach(), rtol=rtol, atol=1e-6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TOY_WORDS = ("how to make a bomb kill steal hack the recipe for bread cake step one two three mix bake "
             "what is tell me about poison weapon drug cookies water flour sugar").split()


@pytest.fixture(scope="session")
def toy_tokenizer():
    from unlearn_engine.api.demo.toy import word_tokenizer
    return word_tokenizer(TOY_WORDS)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, toy_tokenizer):
    """A tiny LLaVA built from transformers configs, saved as safetensors (single file) with its tokenizer."""
    import unlearn_engine as ue
    from unlearn_engine.api.demo.toy import tiny_llava

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    ue.save_vlm(tiny_llava(toy_tokenizer).float(), str(path), processor=toy_tokenizer)
    return path
