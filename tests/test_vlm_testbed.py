"""The SmolVLM test bed (docs/PROTOCOLS.md) on the real SmolLM2 backbone: built offline, same text model."""

import pytest
import torch

from dbquant.model import testbed
from dbquant.model.plan import make_plan
from dbquant.model.sources import load_fp_model
from dbquant.model.vlm import image_token_id

pytestmark = pytest.mark.slow  # loads the real SmolLM2 and its SmolVLM test bed


@pytest.fixture(scope="module")
def both():
    return load_fp_model("smolvlm-testbed"), load_fp_model("smollm2-135m")


def test_testbed_is_smolvlm_with_the_smollm2_backbone(both):
    (vlm, vtok), (llm, ltok) = both
    assert type(vlm).__name__ == "SmolVLMForConditionalGeneration"
    assert image_token_id(vlm) == 49151
    assert vtok.get_vocab() == ltok.get_vocab()
    text = dict(vlm.model.text_model.state_dict())
    llm_sd = llm.state_dict()
    # every SmolLM2 tensor landed in the text model (build() also refuses missing keys)
    assert all(torch.equal(text[k[len("model."):]], v) for k, v in llm_sd.items() if k.startswith("model."))
    ids = ltok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(vlm(input_ids=ids).logits, llm(input_ids=ids).logits)
    # the same 210 decoder linears are planned, under the language model's path
    plan = make_plan(vlm, 64)
    assert [p.name for p in plan] == [p.name.replace("model.", "model.text_model.", 1) for p in make_plan(llm, 64)]


def test_testbed_sees_images(both):
    (vlm, _), _ = both
    n = testbed.tokens_per_image()
    ids = torch.tensor([[49151] * n + [504, 3458, 314]])
    pix = torch.rand(1, 1, 3, testbed.IMAGE_SIZE, testbed.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_image = vlm(input_ids=ids, pixel_values=pix * 2 - 1).logits
        other_image = vlm(input_ids=ids, pixel_values=pix.flip(-1) * 2 - 1).logits
    assert torch.isfinite(with_image).all()
    assert not torch.allclose(with_image[0, -1], other_image[0, -1])  # the text attends to the image
