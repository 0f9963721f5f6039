"""The MFU arithmetic of the training benchmark, and the random models it builds for shapes without weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.mfu import (
    H100_BF16_PEAK_FLOPS,
    attention_seq_len,
    attention_width,
    lora_parameters,
    matmul_parameters,
    mfu,
    training_flops_per_token,
)
from benchmarks.train_vs_trl import SHAPES, build_random_model

# hidden 8, MLP 16, 2 layers, 2 heads of 4, 1 KV head, vocab 32
SMALL = {
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 32,
}


def test_counts_and_mfu_by_hand():
    # One layer's matmuls: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate, up, down 8x16 each = 64+32+32+64+3*128 = 576.
    # Two layers and the LM head (8x32 = 256): 1408.
    assert matmul_parameters(SMALL) == 2 * 576 + 256 == 1408
    # LoRA rank 2 on every decoder linear layer, rank * (in + out) each:
    # q 2*16 + k 2*12 + v 2*12 + o 2*16 + gate, up, down 2*24 each = 32+24+24+32+144 = 256 a layer.
    assert lora_parameters(SMALL, rank=2) == 2 * 256 == 512
    assert lora_parameters(SMALL, rank=2, target_modules="q_proj,v_proj") == 2 * (32 + 24)
    assert attention_width(SMALL) == 8
    # 4 * 1408 + 6 * 512 + 12 * 2 layers * 8 * 10 tokens = 5632 + 3072 + 1920
    assert training_flops_per_token(SMALL, lora_rank=2, mean_seq_len=10) == 10624
    assert mfu(SMALL, lora_rank=2, mean_seq_len=10, tokens_per_second=1e6, peak_flops=1e12) == pytest.approx(0.010624)
    assert H100_BF16_PEAK_FLOPS == 989e12


def test_head_dim_wider_than_hidden_over_heads():
    # Qwen3-style: head_dim given explicitly, query width 2 x 8 = 16, not the hidden size.
    config = {**SMALL, "head_dim": 8}
    assert attention_width(config) == 16
    assert matmul_parameters(config) == 2 * (8 * 16 + 8 * 8 + 8 * 8 + 16 * 8 + 3 * 128) + 256


def test_attention_seq_len_is_token_weighted():
    # 1 token attending over 1 and 3 tokens over 3: (1*1 + 3*3) / 4
    assert attention_seq_len([1, 3]) == 2.5
    assert attention_seq_len([5, 5]) == 5


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # peft 0.21 vs transformers 5
def test_counts_match_a_real_model_and_peft():
    """The formula's N_matmul is every nn.Linear weight (LM head included), its N_lora what peft trains."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(**SMALL, head_dim=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    assert matmul_parameters(config) == linear
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert lora_parameters(config, rank=2) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape, low, high", [("qwen2-0.5b", 0.35e9, 0.55e9), ("qwen2-1.5b", 1.3e9, 1.6e9)])
def test_named_shapes_have_their_size(shape, low, high):
    config = LlamaConfig(
        **{key: value for key, value in SHAPES[shape].items() if key != "rope_theta"},
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # sizes without memory
        model = LlamaForCausalLM(config)
    assert low < sum(p.numel() for p in model.parameters()) < high
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    assert matmul_parameters(config) == linear


def test_random_model_is_loadable_seeded_and_reused(tiny_model_dir, tmp_path):
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
    }
    first = build_random_model(tmp_path / "a", shape, tokenizer_dir=tiny_model_dir, seed=3)
    second = build_random_model(tmp_path / "b", shape, tokenizer_dir=tiny_model_dir, seed=3)

    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert model.config.hidden_size == 32 and model.config.num_key_value_heads == 2
    assert model.config.vocab_size == len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=True, return_tensors="pt")
    assert torch.isfinite(model(input_ids=ids["input_ids"]).logits).all()
    other = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32).state_dict()
    assert all(torch.equal(tensor, other[name]) for name, tensor in model.state_dict().items())

    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_random_model(first, shape, tokenizer_dir=tiny_model_dir, seed=3) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # same recipe: reused
    assert json.loads((first / ".ready").read_text())["seed"] == 3
    build_random_model(first, shape, tokenizer_dir=tiny_model_dir, seed=4)
    assert json.loads((first / ".ready").read_text())["seed"] == 4  # another recipe: rebuilt


def test_device_command_is_the_documented_one():
    """The command --prepare-gpu-carry prints is the one the module docstring tells a GPU session to run."""
    import benchmarks.train_vs_trl as benchmark

    assert benchmark.DEVICE_COMMAND in benchmark.__doc__
    assert "--preset gpu" in benchmark.DEVICE_COMMAND and benchmark.PRESETS["gpu"]["device"] == "cuda"


def test_the_tiny_model_is_built_by_the_same_builder_and_returns_its_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llm.bundled import build_tiny_model

    dest = tmp_path / "tiny"
    assert build_tiny_model(dest, tokenizer_source=tiny_model_dir) == dest
    assert AutoModelForCausalLM.from_pretrained(dest).config.hidden_size == 64
