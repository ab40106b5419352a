"""`mopt.engine.evaluate`: perplexity, KL and top-1 agreement against plain torch computations."""

import math

import pytest
import torch

from mopt.engine.evaluate import evaluate, windows
from mopt.engine.loader import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_llama

    hf = tiny_llama(256)
    path = tmp_path_factory.mktemp("eval-llama")
    hf.save_pretrained(path)
    return hf, load_model(path)


def test_windows():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] predicts nothing
    with pytest.raises(ValueError, match="context"):
        windows([1, 2], 1)


def test_perplexity_equals_transformers_loss(tiny):
    hf, ours = tiny
    ids = torch.randint(0, 320, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    result = evaluate(ours, ids, context=32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, 32):
            t = torch.tensor([w])
            nll += hf(t, labels=t).loss.item() * (len(w) - 1)
            count += len(w) - 1
    assert result.tokens == count == 31 + 31 + 5
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_reference_metrics(tiny):
    _, ours = tiny
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    same = evaluate(ours, ids, context=16, reference=ours)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0

    class Shifted(torch.nn.Module):  # uniform logits: KL = log(V) - H(ref)
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return torch.zeros(*ids.shape, 320)

    other = evaluate(Shifted(), ids, context=16, reference=ours)
    assert other.perplexity == pytest.approx(320, rel=1e-5)
    assert other.mean_kl > 0 and other.reference_perplexity == pytest.approx(same.perplexity)


def test_too_short_text(tiny):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        evaluate(tiny[1], [5], context=8)
