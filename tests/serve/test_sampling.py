import pytest
import torch

from llm.serve.sampling import make_generator, sample_next_token

LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))


def draws(n, **settings):
    generator = make_generator(7, "cpu")
    return [sample_next_token(LOGITS, generator=generator, **settings) for _ in range(n)]


def test_it_picks_the_most_likely_token_when_greedy():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample_next_token(logits, temperature=0.0, top_p=1.0) == 1
    assert sample_next_token(logits, temperature=1.0, top_p=1.0, do_sample=False) == 1
    assert sample_next_token(logits.reshape(1, -1), temperature=0.0) == 1


def test_it_samples_every_token_without_filtering():
    assert set(draws(400, temperature=1.0, top_p=1.0)) == {0, 1, 2, 3}


def test_it_samples_only_inside_the_nucleus():
    # 0.4 + 0.3 reach top_p 0.5 first: tokens 2 and 3 are out.
    assert set(draws(400, temperature=1.0, top_p=0.5)) == {0, 1}


def test_it_keeps_the_top_token_for_a_tiny_top_p():
    assert set(draws(50, temperature=1.0, top_p=1e-6)) == {0}


def test_it_sharpens_with_a_low_temperature():
    assert set(draws(200, temperature=0.05, top_p=1.0)) == {0}


def test_it_repeats_itself_for_the_same_seed():
    assert draws(100, temperature=1.0, top_p=0.9) == draws(100, temperature=1.0, top_p=0.9)
    unseeded = make_generator(None, "cpu"), make_generator(None, "cpu")
    first, second = ([sample_next_token(LOGITS, generator=g) for _ in range(100)] for g in unseeded)
    assert first != second


@pytest.mark.parametrize("temperature", [1e-30, 1e-8, 5e-324])
def test_a_tiny_temperature_is_as_sharp_as_greedy_not_a_crash(temperature):
    logits = torch.tensor([1.0, 3.5, 2.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, temperature=temperature, generator=generator) for _ in range(20)}
    assert picks == {1}
