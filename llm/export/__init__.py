"""Portable exports of a model: GGUF files for llama.cpp and Ollama, their Modelfile, and the check that they answer
as the model they came from. Plain Python; no Django."""

from .gguf import QUANTS, GGUFExportError, GGUFVocabulary, read_vocabulary, tensor_count, write_gguf

__all__ = ["QUANTS", "GGUFExportError", "GGUFVocabulary", "read_vocabulary", "tensor_count", "write_gguf"]
