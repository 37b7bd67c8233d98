"""The shipped demo model (models/shakespeare-bitnet) through the exporter, against transformers.

Same harness and tolerances as tests/test_export.py, on a checkpoint trained for real (not
random weights): a chat prompt from its own tokenizer and template, then transformers' 32
greedy tokens fed one by one through the KV cache (teacher forcing). At every step the logits
must agree within the tolerance and our argmax must be the reference's, up to near ties.
Free-running greedy text is not compared: on this model transformers' own generate() and its
step-by-step cached forward disagree at step 12 (a quantization tie flips one int8 activation
and moves a logit by 0.3), so the reference is not self-consistent there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import export_checkpoint
from runtime.folder import VARIANTS
from tests.checkpoints import load_reference
from tests.export_harness import (GrowingCache, SharedBuffer, load_config, make_session, reference_greedy,
                                  reference_logits)
from tests.test_export import RELATIVE_TOLERANCE

DEMO = Path(__file__).resolve().parent.parent / "models" / "shakespeare-bitnet"
# MatMulNBits with accuracy_level 4 re-quantizes its (int8-valued) input per block with scale
# max|block|/127; on this trained model many blocks have a max below 127, so int2 is as
# approximate as int4 here (measured 0.06 of max |logit| 15.7) and gets int4's bound.
TOLERANCE = dict(RELATIVE_TOLERANCE, int2=RELATIVE_TOLERANCE["int4"])
# An int8 activation that lands on a rounding tie can round one way in onnxruntime and the other
# in torch; the step then differs by a few hundredths (measured on the 2000-step model, ternary
# and fp32 alike: step 17 of 32 by 0.037 of max |logit| 18.1, steps 22-26 up to 0.035 through
# the cached keys/values, the others ~1e-5). Such steps may reach the int4 bound, at most
# TIE_STEPS of them per run; every other step keeps the variant's own tolerance.
TIE_STEPS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tokenizers import Tokenizer

    out = export_checkpoint(str(DEMO), str(tmp_path_factory.mktemp("demo") / "onnx"), VARIANTS,
                            progress=lambda m: None)
    tokenizer = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    prompt = tokenizer.encode("<|begin_of_text|>User: Good morrow, my lord.<|eot_id|>Assistant: ",
                              add_special_tokens=False).ids
    model = load_reference(DEMO)
    tokens = reference_greedy(model, prompt, 32)
    return {"out": out, "cfg": load_config(out), "prompt": prompt, "greedy": tokens,
            "greedy_logits": reference_logits(model, prompt, tokens[:-1])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_model_matches_transformers(exported, variant):
    session = make_session(exported["out"], variant)
    prompt, tokens, expected = exported["prompt"], exported["greedy"], exported["greedy_logits"]
    scale = max(float(np.abs(x).max()) for x in expected)
    tolerance = TOLERANCE[variant] * scale
    for runner_class in (GrowingCache, SharedBuffer):
        runner = runner_class(session, exported["cfg"])
        got = [runner.step(prompt)] + [runner.step([t]) for t in tokens[:-1]]
        ties = 0
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape
            diff = float(np.abs(g - e).max())
            ties += diff > tolerance
            assert diff <= TOLERANCE["int4"] * scale, (runner_class.__name__, i)
            ours, theirs = int(np.argmax(g[-1])), int(np.argmax(e[-1]))
            assert ours == theirs or e[-1][theirs] - e[-1][ours] <= max(tolerance, diff), (runner_class.__name__, i)
        assert ties <= TIE_STEPS, (runner_class.__name__, ties)
