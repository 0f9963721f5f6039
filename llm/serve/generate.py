"""The token loop: one forward pass per token over a KV cache, streamed as text pieces."""

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, closing, nullcontext
from functools import partial

import torch
from transformers import DynamicCache

from .hf import CausalLM, TokenDecoder
from .sampling import make_generator, sample_next_token
from .schema import Completion, GenerationRequest, StreamEvent
from .text import IncrementalDecoder, OutputFilter


def stream_completion(
    model: CausalLM,
    tokenizer: TokenDecoder,
    prompt_ids: list[int],
    request: GenerationRequest,
    *,
    end_token_ids: frozenset[int],
    step: Callable[[], AbstractContextManager[CausalLM]] | None = None,
) -> Generator[StreamEvent, None, None]:
    """Yield the answer to a rendered prompt as text pieces, then one Completion.

    step, when given, is entered around every forward pass and yields the model to
    run it with (see generate_tokens): how streams that share a model take turns.
    """
    pick = partial(
        sample_next_token,
        temperature=request.temperature,
        top_p=request.top_p,
        do_sample=request.do_sample,
        generator=make_generator(request.seed, model.device),
    )
    decoder = IncrementalDecoder(tokenizer)
    output = OutputFilter(stop=request.stop_strings, tools=bool(request.tools))
    finish_reason = "length"
    completion_tokens = 0
    tokens = generate_tokens(
        model, prompt_ids, max_new_tokens=request.max_tokens, pick=pick, end_token_ids=end_token_ids, step=step
    )
    with closing(tokens):
        for token in tokens:
            completion_tokens += 1
            if token in end_token_ids:
                finish_reason = "stop"
                break
            piece = output.push(decoder.push(token))
            if piece:
                yield piece
            if output.stopped:
                finish_reason = "stop"
                break
    piece = output.push(decoder.flush())
    if piece:
        yield piece
    content, tool_calls, piece = output.finish()
    if piece:
        yield piece
    yield Completion(
        content=content,
        finish_reason="tool_calls" if tool_calls else finish_reason,
        prompt_tokens=len(prompt_ids),
        completion_tokens=completion_tokens,
        tool_calls=tool_calls,
    )


def generate_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], int],
    end_token_ids: frozenset[int] = frozenset(),
    step: Callable[[], AbstractContextManager[CausalLM]] | None = None,
) -> Generator[int, None, None]:
    """Yield new token ids one at a time until an end token or max_new_tokens.

    The first pass reads the whole prompt; each later pass reads only the last token
    and the cache of keys and values from before, so every step costs about the same.
    Each pass runs inside `step()` (default: just `model`), whose value is the model
    to call: the cache belongs to this stream, so others may use the model between passes.
    """
    step = step or (lambda: nullcontext(model))
    cache = DynamicCache(config=model.config)
    next_input = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    for _ in range(max_new_tokens):
        with step() as current:
            token = _next_token(current, next_input, cache, pick)
        yield token
        if token in end_token_ids:
            return
        next_input = torch.tensor([[token]], dtype=torch.long, device=model.device)


# inference_mode wraps each step rather than the whole generator: a context held
# across `yield` would leak into the consumer's code (and thread) while it is paused.
@torch.inference_mode()
def _next_token(
    model: CausalLM, input_ids: torch.Tensor, cache: DynamicCache, pick: Callable[[torch.Tensor], int]
) -> int:
    logits: torch.Tensor = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return pick(logits[0, -1])
