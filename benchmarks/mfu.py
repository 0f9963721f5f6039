"""Model-FLOPs utilisation of a LoRA fine-tune: useful arithmetic per second over the chip's peak.

    MFU = (4 * N_matmul + 6 * N_lora + 12 * layers * d_attn * seq_len) * tokens_per_second / peak_flops

The FLOPs a training token needs, by the usual accounting (2 FLOPs per weight
per token for a forward matmul, twice that for the backward):

- 4 * N_matmul: the frozen base runs forward (2) and backward for the input
  gradients only (2); its weights get no gradient.
- 6 * N_lora: the adapters run forward (2) and backward for inputs and weights (4).
- 12 * layers * d_attn * seq_len: attention scores and the weighted sum over the
  values (2 matmuls of 2 FLOPs per key, 3 times for forward and backward), with
  d_attn = num_heads * head_dim, over the full seq_len x seq_len matrix. Causal
  masking would halve it; the convention (PaLM, appendix B) counts it whole.

What N_matmul counts: the weight matrices of every linear layer of the base
model (q, k, v, o, gate, up, down in each layer) and the LM head, which is a
matmul even when it shares its weight with the embedding. The embedding lookup,
norms and biases are not matmuls and are left out. The formula charges the full
vocabulary LM head to every token, as the issue that asked for this number
defines it; our engine computes logits only at trained positions (assistant
tokens), so it does less LM-head work than the formula credits, and a trainer
that computes every logit does the work it is credited with.

seq_len: each token attends to the tokens of its own example (the trainers
never attend across examples), so the attention FLOPs of a run are
12 * layers * d_attn * sum(length ** 2) and the per-token figure takes the
token-weighted mean length sum(length ** 2) / sum(length): see
attention_seq_len(). The plain mean length is smaller when lengths vary.

Config values are read from a transformers config object or its config.json
as a dict; the architecture is Llama's (SmolLM2, Qwen2 and most decoder-only
models share its matmul shapes).
"""

from collections.abc import Iterable, Mapping

H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100 or H200 SXM (the datasheet's 1,979 TFLOP/s is with 2:4 sparsity)."""

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def _value(config, name: str, default=None):
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def head_dim(config) -> int:
    return int(
        _value(config, "head_dim", None) or _value(config, "hidden_size") // _value(config, "num_attention_heads")
    )


def attention_width(config) -> int:
    """d_attn: the width of the attention's query (and output) projection, num_heads * head_dim."""
    return int(_value(config, "num_attention_heads")) * head_dim(config)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer, and of the LM head."""
    hidden, intermediate = int(_value(config, "hidden_size")), int(_value(config, "intermediate_size"))
    query = attention_width(config)
    key_value = int(_value(config, "num_key_value_heads", _value(config, "num_attention_heads"))) * head_dim(config)
    return {
        "q_proj": (hidden, query),
        "k_proj": (hidden, key_value),
        "v_proj": (hidden, key_value),
        "o_proj": (query, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
        "lm_head": (hidden, int(_value(config, "vocab_size"))),
    }


def matmul_parameters(config) -> int:
    """N_matmul: weights of every decoder linear layer plus the LM head (no embedding, norms or biases)."""
    shapes = linear_shapes(config)
    per_layer = sum(shapes[name][0] * shapes[name][1] for name in ATTENTION_MODULES + MLP_MODULES)
    return int(_value(config, "num_hidden_layers")) * per_layer + shapes["lm_head"][0] * shapes["lm_head"][1]


def lora_targets(target_modules: str | Iterable[str]) -> list[str]:
    """Module names an adapter wraps: "all-linear" is every decoder linear layer, not the LM head (as in peft)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return list(ATTENTION_MODULES + MLP_MODULES)
        target_modules = target_modules.split(",")
    return [name.strip() for name in target_modules if name.strip()]


def lora_parameters(config, *, rank: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    """N_lora: rank * (in + out) for A and B of each wrapped linear layer, every layer (the LM head once)."""
    shapes = linear_shapes(config)
    layers = int(_value(config, "num_hidden_layers"))
    total = 0
    for name in lora_targets(target_modules):
        if name not in shapes:
            raise ValueError(f"unknown LoRA target {name!r}: this count knows {', '.join(shapes)}")
        fan_in, fan_out = shapes[name]
        total += rank * (fan_in + fan_out) * (1 if name == "lm_head" else layers)
    return total


def attention_seq_len(lengths: Iterable[int]) -> float:
    """The sequence length a trained token attends over, on average: sum(length ** 2) / sum(length)."""
    lengths = list(lengths)
    return sum(length * length for length in lengths) / sum(lengths)


def training_flops_per_token(
    config, *, lora_rank: int, target_modules: str | Iterable[str] = "all-linear", mean_seq_len: float
) -> float:
    """4 * N_matmul + 6 * N_lora + 12 * layers * d_attn * mean_seq_len."""
    return (
        4 * matmul_parameters(config)
        + 6 * lora_parameters(config, rank=lora_rank, target_modules=target_modules)
        + 12 * int(_value(config, "num_hidden_layers")) * attention_width(config) * mean_seq_len
    )


def mfu(
    config,
    *,
    lora_rank: int,
    target_modules: str | Iterable[str] = "all-linear",
    mean_seq_len: float,
    tokens_per_second: float,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
) -> float:
    """Model-FLOPs utilisation of a LoRA run that trains tokens_per_second tokens (0.3 = 30%)."""
    flops = training_flops_per_token(
        config, lora_rank=lora_rank, target_modules=target_modules, mean_seq_len=mean_seq_len
    )
    return flops * tokens_per_second / peak_flops
