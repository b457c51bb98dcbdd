"""Token attributions against closed forms (linear and cubic models) and the completeness axiom on
tiny random BERT and Llama classifiers built from a config."""

from __future__ import annotations

import pytest
import torch

from strop.eval.attribution import (
    gradient_x_input,
    html_attributions,
    integrated_gradients,
    render_attributions,
    top_tokens,
)

IDS = torch.tensor([[5, 17, 42, 8, 63, 21, 9]])  # (1, t)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,  # batches of path points need it; with inputs_embeds the last token is pooled
        num_labels=2,
    )
    return LlamaForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module", params=["bert", "llama"])
def classifier(request):
    """(model, forward, embeddings (1, t, h)) for one tiny random classifier."""
    model = {"bert": _bert, "llama": _llama}[request.param]()
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(IDS)

    def forward(e, m):
        return model(inputs_embeds=e, attention_mask=m).logits

    return model, forward, embeddings


def _linear(w):
    """A model linear in its embeddings: logit c = sum over tokens and hidden of e * w[c]."""
    return lambda e, m: torch.einsum("bth,cth->bc", e, w)  # (b, c)


def test_linear_model_attributions_are_exact():
    torch.manual_seed(0)
    w = torch.randn(2, 5, 4, dtype=torch.float64)  # (c, t, h)
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    x0 = torch.randn(1, 5, 4, dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.long)
    ig = integrated_gradients(_linear(w), x, mask, target=1, baseline=x0, steps=3)
    torch.testing.assert_close(ig.attributions, ((x - x0)[0] * w[1]).sum(-1), rtol=0, atol=1e-12)
    assert ig.logit == pytest.approx((x * w[1]).sum().item(), abs=1e-12)
    assert ig.baseline_logit == pytest.approx((x0 * w[1]).sum().item(), abs=1e-12)
    assert abs(ig.delta) < 1e-12
    gxi = gradient_x_input(_linear(w), x, mask, target=1)
    torch.testing.assert_close(gxi, (x[0] * w[1]).sum(-1), rtol=0, atol=1e-12)
    from_zero = integrated_gradients(_linear(w), x, mask, target=1).attributions
    torch.testing.assert_close(from_zero, gxi, rtol=0, atol=1e-12)


def test_cubic_model_matches_closed_form():
    """f = sum w * e^3 separates per element, so IG from x0 is exactly w * (x^3 - x0^3): a check that
    the path points and weights form a true quadrature (this integrand needs >= 5 points)."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, dtype=torch.float64)  # (t, h)
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    x0 = torch.randn(1, 6, 3, dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.long)

    def forward(e, m):
        return (w * e**3).sum((-1, -2))[:, None]  # (b, 1)

    ig = integrated_gradients(forward, x, mask, target=0, baseline=x0, steps=8, batch=3)
    torch.testing.assert_close(ig.attributions, (w * (x[0] ** 3 - x0[0] ** 3)).sum(-1), rtol=0, atol=1e-10)
    coarse = integrated_gradients(forward, x, mask, target=0, baseline=x0, steps=2)
    assert abs(coarse.delta) > 1e-3  # too few points is visible in delta, so delta is not vacuous


def test_completeness_on_tiny_models(classifier):
    model, forward, x = classifier
    mask = torch.ones_like(IDS)
    ig = integrated_gradients(forward, x, mask, target=1, steps=64)
    change = ig.logit - ig.baseline_logit
    assert abs(change) > 1e-3  # the relative check below is not 0 / 0
    assert abs(ig.delta) < 0.01 * abs(change)
    with torch.no_grad():
        assert ig.logit == pytest.approx(forward(x, mask)[0, 1].item(), abs=1e-5)
    assert ig.attributions.shape == (IDS.shape[1],)


def test_token_equal_to_baseline_gets_zero(classifier):
    model, forward, _ = classifier
    ids = IDS.clone()
    ids[0, 2] = 3
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)  # (1, t, h)
        pad_like = model.get_input_embeddings().weight[3]  # (h,): broadcast over tokens
    ig = integrated_gradients(forward, x, torch.ones_like(ids), target=1, baseline=pad_like, steps=16)
    assert ig.attributions[2] == 0
    assert (ig.attributions[[0, 1, 3, 4, 5, 6]] != 0).all()


def test_masked_tokens_get_zero_in_bert():
    """BERT pools position 0 and masked keys get no attention weight, so a masked token cannot move
    the logit: nonzero attribution there would mean the mask did not reach every path point."""
    model = _bert()
    with torch.no_grad():
        x = model.get_input_embeddings()(IDS)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])

    def forward(e, m):
        return model(inputs_embeds=e, attention_mask=m).logits

    ig = integrated_gradients(forward, x, mask, target=1, steps=8, batch=3)
    assert ig.attributions[5:].abs().max() < 1e-12
    assert ig.attributions[:5].abs().min() > 0


def test_chunking_does_not_change_the_result(classifier):
    _, forward, x = classifier
    mask = torch.ones_like(IDS)
    small = integrated_gradients(forward, x, mask, target=1, steps=64, batch=3)  # 21 chunks of 3, one of 1
    whole = integrated_gradients(forward, x, mask, target=1, steps=64, batch=64)
    torch.testing.assert_close(small.attributions, whole.attributions, rtol=0, atol=1e-6)
    assert small.delta == pytest.approx(whole.delta, abs=1e-6)


def test_no_parameter_grads_and_grad_mode_restored(classifier):
    model, forward, x = classifier
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        ig = integrated_gradients(forward, x, mask, target=0, steps=4, batch=2)
        gxi = gradient_x_input(forward, x, mask, target=0)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert ig.attributions.abs().sum() > 0 and gxi.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_more_than_one_example_is_refused():
    w = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="one example at a time"):
        integrated_gradients(_linear(w), torch.randn(2, 5, 4), torch.ones(2, 5), target=0)


def test_top_tokens_order_by_magnitude():
    tokens = ["a", "b", "c", "d"]
    scores = torch.tensor([0.1, -0.5, 0.3, 0.0])
    assert top_tokens(tokens, scores, k=2) == [("b", pytest.approx(-0.5)), ("c", pytest.approx(0.3))]
    assert [t for t, _ in top_tokens(tokens, scores)] == ["b", "c", "a", "d"]


def test_render_attributions_plain_text():
    text = render_attributions(["great", "movie", "not"], [0.42, 0.1, -0.31])
    assert text == "great[+0.42] movie[+0.10] not[-0.31]"


def test_html_attributions_escape_and_shade():
    snippet = html_attributions(["<b>", "&x", "ok"], [-0.8, 0.4, 0.0])
    assert "<b>" not in snippet and "&lt;b&gt;" in snippet and "&amp;x" in snippet
    spans = snippet.split("<span")[1:]
    assert "rgba(200, 0, 0, 1.00)" in spans[0]  # the largest |score| is fully shaded, red against
    assert "rgba(0, 160, 0, 0.50)" in spans[1]  # half as strong, green for the target
    assert 'title="+0.4000"' in spans[1]
