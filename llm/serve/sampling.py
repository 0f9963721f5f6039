"""Choosing the next token from the model's scores."""

import torch

MIN_TEMPERATURE = 1e-4
"""Below this, dividing the scores overflows to infinity; the distribution is as sharp as greedy anyway."""


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    do_sample: bool = True,
) -> int:
    """Return the next token id: greedy, or sampled with temperature and nucleus (top_p) filtering."""
    logits = logits.reshape(-1)
    if not do_sample or temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep a token while the mass of the tokens ranked above it is below top_p,
    # so the most likely token always stays in.
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    kept = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
    choice = torch.multinomial(kept, 1, generator=generator)
    return int(order[choice])


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """Return a random generator of its own for one request, seeded when a seed is given."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd, about 2**64 / golden ratio: consecutive choices land far apart
_SEED_SPACE = 2**63


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request asking for n choices: the request's own for the first
    (so n=1 answers as before), a different but fixed one for each other; None stays None."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STRIDE) % _SEED_SPACE
