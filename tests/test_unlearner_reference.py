"""NPO without a second model in memory: the reference log-likelihoods are computed once, before the first step,
from the model not yet trained, stored with the checkpoints (a resume reuses them, never recomputing them from
restored weights), and no frozen copy is kept; only KL-retain (and RMU) keep a reference model."""
import copy
import json

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api import reference_values
from unlearn_engine.api.data import encode

FORGET = [ue.Record("how to make a bomb", "step one mix poison"),
          ue.Record("tell me about the weapon", "step one mix drug step two bake the poison"),
          ue.Record("how to hack", "steal")]
RETAIN = [ue.Record("the recipe for bread", "mix flour water bake", "retain"),
          ue.Record("tell me about cookies", "sugar", "retain")]


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return ue.load_vlm(str(tiny_llava_dir), dtype="float32")


def _run(base, out, steps, resume=False, **config):
    model = copy.deepcopy(base[0])
    run = ue.Unlearner(model, base[1], method="npo", steps=steps, lr=1e-2, batch_size=2, checkpoint_every=1,
                       out_dir=str(out), progress=False, **config)
    assert run.ref_model is None  # no deepcopy of the model for NPO
    run.fit(FORGET, RETAIN, resume=resume)
    return model, run


def test_npo_reference_computed_once_from_the_untrained_model(base, tmp_path):
    """Catches reference values taken from a trained model, a missing sample, or a kept second model."""
    model0, tok = base
    expected = {}
    for i, r in enumerate(FORGET):  # one record at a time: no padding, an independent computation
        batch = encode([r], tok)
        expected[("f", i)] = float(ue.reference_logp(model0, batch["input_ids"], batch["labels"],
                                                     attention_mask=batch["attention_mask"]))
    model, run = _run(base, tmp_path, 3)
    assert run.ref_model is None
    assert set(run._ref_logp_cache) == set(expected)
    for key, value in expected.items():
        assert run._ref_logp_cache[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    state = json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())
    assert {tuple(json.loads(k)): v for k, v in state["ref_logp"].items()} == run._ref_logp_cache
    assert ue.Unlearner(copy.deepcopy(model0), tok, method="kl", progress=False).ref_model is not None


def test_resume_reuses_the_stored_reference(base, tmp_path, monkeypatch):
    """Catches a resume that recomputes the reference from the restored (trained) weights: the resumed run
    calls no reference pass and ends bit-identical to the uninterrupted run."""
    straight, _ = _run(base, tmp_path / "a", 3)
    _run(base, tmp_path / "b", 1)

    def no_reference(*args, **kwargs):
        raise AssertionError("reference log-likelihoods recomputed on resume")

    monkeypatch.setattr(reference_values, "reference_logp", no_reference)
    resumed, _ = _run(base, tmp_path / "b", 3, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
