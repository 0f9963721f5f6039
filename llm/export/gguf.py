"""Write a Llama-shaped Hugging Face model folder as one GGUF file (f16 or q8_0), for llama.cpp and Ollama.

The file carries what those runtimes need and nothing of the machine it was made on:
the llama tensor names, the hyper-parameters, the byte-level BPE tokenizer (tokens,
types, merges, special ids), the chat template, and the end-of-turn token as eos so
that generation stops where a chat turn ends.

llama.cpp stores the query and key projections with each head's rotary halves
interleaved; transformers undoes that on load (`LlamaTensorProcessor` in
`transformers/modeling_gguf_pytorch_utils.py`), so the writer applies the inverse.
Tensors are converted one at a time: memory stays at about one tensor, and the
caller hears after each one (`progress(done, total)`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

QUANTS = ("f16", "q8_0")
"""The GGUF flavours offered: f16 is exact up to half precision, q8_0 rounds weights to 8 bits in blocks of 32."""

_Q8_BLOCK = 32
_Q8_BLOCK_BYTES = 34  # 32 int8 values and one f16 scale


class GGUFExportError(ValueError):
    """The model folder cannot be written as GGUF (its architecture, rope scaling or tokenizer is not supported)."""


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer as a GGUF file spells it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int
    """The end-of-turn token: generation in llama.cpp and Ollama stops on it."""
    unk_id: int | None
    pad_id: int | None
    chat_template: str | None


def permute_for_gguf(weights: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """Interleave each head's rotary halves the way llama.cpp stores q_proj and k_proj (rows per head: 2 x half)."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(
    model_dir: Path,
    dest: Path,
    *,
    quant: str,
    name: str,
    vocabulary: GGUFVocabulary,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write model_dir's weights and `vocabulary` as a GGUF file at dest; return dest.

    name: the model's name in the file (`general.name`), never a path.
    """
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    _check_llama(config)
    tensors = _TensorSource(Path(model_dir))
    plan = _tensor_plan(config, tensors.shapes, quant)

    writer = gguf.GGUFWriter(str(dest), arch="llama")
    _add_metadata(writer, config, quant=quant, name=name, vocabulary=vocabulary)
    for _, gguf_name, shape, qtype in plan:
        nbytes = _nbytes(shape, qtype)
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        heads, kv_heads = (
            config["num_attention_heads"],
            config.get("num_key_value_heads") or config["num_attention_heads"],
        )
        for done, (hf_name, gguf_name, _, qtype) in enumerate(plan, start=1):
            data = tensors.read(hf_name)
            if gguf_name.endswith("attn_q.weight"):
                data = permute_for_gguf(data, heads)
            elif gguf_name.endswith("attn_k.weight"):
                data = permute_for_gguf(data, kv_heads)
            writer.write_tensor_data(gguf.quants.quantize(data, qtype))
            if progress is not None:
                progress(done, len(plan))
    finally:
        writer.close()
    return dest


def tensor_count(model_dir: Path) -> int:
    """How many tensors write_gguf writes for this folder (the N of "writing GGUF n/N tensors")."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return len(_tensor_plan(config, _TensorSource(Path(model_dir)).shapes, "f16"))


def _check_llama(config: Mapping[str, Any]) -> None:
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type is {config.get('model_type')!r}, only 'llama' is written")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention or MLP biases are not supported")
    if problems:
        raise GGUFExportError("cannot write this model as GGUF: " + "; ".join(problems))


def _tensor_plan(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], quant: str
) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """(hf name, gguf name, shape, GGML type) per tensor, in file order: embeddings, blocks, output."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for hf_name, shape in shapes.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue  # tied: llama.cpp reuses token_embd
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise GGUFExportError(f"no GGUF name for the tensor {hf_name!r}")
        plan.append((hf_name, gguf_name, shape, _qtype(shape, quant)))  # the suffix is kept: blk.0.attn_q.weight
    return sorted(plan, key=lambda item: _file_order(item[1]))


def _file_order(gguf_name: str) -> tuple[int, int, str]:
    if gguf_name.startswith("token_embd"):
        return (0, 0, gguf_name)
    if gguf_name.startswith("blk."):
        return (1, int(gguf_name.split(".")[1]), gguf_name)
    return (2, 0, gguf_name)


def _qtype(shape: tuple[int, ...], quant: str) -> Any:
    """Norms (1-D) stay f32 as llama.cpp keeps them; matrices are f16, or q8_0 where rows split into blocks."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if quant == "q8_0" and shape[-1] % _Q8_BLOCK == 0:
        return T.Q8_0
    return T.F16


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGMLQuantizationType as T

    count = int(np.prod(shape))
    if qtype == T.Q8_0:
        return count // _Q8_BLOCK * _Q8_BLOCK_BYTES
    return count * (4 if qtype == T.F32 else 2)


def _add_metadata(writer: Any, config: Mapping[str, Any], *, quant: str, name: str, vocabulary: GGUFVocabulary) -> None:
    import gguf

    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])

    writer.add_tokenizer_model("gpt2")
    # "gpt2" splits text as transformers' byte-level tokenizer does, which is what the model was fine-tuned with.
    writer.add_tokenizer_pre("gpt2")
    tokens, types = _padded(vocabulary, config["vocab_size"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(vocabulary.merges)
    if vocabulary.bos_id is not None:
        writer.add_bos_token_id(vocabulary.bos_id)
    writer.add_eos_token_id(vocabulary.eos_id)
    writer.add_eot_token_id(vocabulary.eos_id)
    if vocabulary.unk_id is not None:
        writer.add_unk_token_id(vocabulary.unk_id)
    if vocabulary.pad_id is not None:
        writer.add_pad_token_id(vocabulary.pad_id)
    writer.add_add_bos_token(False)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)


def _padded(vocabulary: GGUFVocabulary, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens for every embedding row: rows past the tokenizer's vocabulary get unused placeholders."""
    from gguf import TokenType

    tokens, types = list(vocabulary.tokens), list(vocabulary.token_types)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types


class _TensorSource:
    """The safetensors files of a model folder, read one tensor at a time as float32."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        """Each tensor's shape, read from the file headers (not the weights)."""
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise GGUFExportError("the model folder has no safetensors weights")
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = path
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def read(self, name: str) -> npt.NDArray[np.float32]:
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return np.ascontiguousarray(tensor.to(torch.float32).numpy())


def read_vocabulary(model_dir: Path) -> GGUFVocabulary:
    """The byte-level BPE tokenizer of model_dir, with its chat template and end-of-turn token."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    raw = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    model, pre = raw.get("model") or {}, raw.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise GGUFExportError("only byte-level BPE tokenizers (GPT-2 style) are written to GGUF")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise GGUFExportError("the tokenizer's ids are not contiguous")
    added = tokenizer.added_tokens_decoder
    types = [
        int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added else int(TokenType.NORMAL)
        for i in range(len(by_id))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocabulary(
        tokens=[by_id[i] for i in range(len(by_id))],
        token_types=types,
        merges=merges,
        bos_id=tokenizer.bos_token_id,
        eos_id=end_of_turn_id(tokenizer),
        unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    )


def end_of_turn_id(tokenizer: Any) -> int:
    """The special token the chat template writes right after an assistant's answer; else the tokenizer's eos."""
    eos: int | None = tokenizer.eos_token_id
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        marker = "Fine-tune-console-answer"
        text: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = text[text.rfind(marker) + len(marker) :]
        ids: list[int] = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if ids and ids[0] in special:
            return ids[0]
    if eos is None:
        raise GGUFExportError("the tokenizer has no end-of-turn or eos token")
    return eos
