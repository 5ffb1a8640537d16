"""Tiny random Hugging Face models of each supported family, made by `transformers` itself (test-only dependency).

Every parameter is redrawn at random (transformers initializes norms to constants and biases to zero, which would
hide a mapping mistake), and each family exercises what makes it different: Llama untied and tied with q/k/v/o
biases, Qwen3 with qk-norm and a head_dim that is not hidden / heads, Mistral with a sliding window on every layer,
Gemma 3 with local and global layers (different RoPE thetas), sandwich norms, its query scale and final logit
soft-capping.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96
WINDOW = 4  # Hugging Face's sliding_window (W keys).
_DIMS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)

FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_DIMS, num_hidden_layers=2, rope_parameters={"rope_theta": 500.0})
    ),
    "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_DIMS, num_hidden_layers=2, attention_bias=True, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_DIMS, num_hidden_layers=2, head_dim=12)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_DIMS, num_hidden_layers=2, sliding_window=WINDOW)
    ),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            **_DIMS,
            num_hidden_layers=3,
            head_dim=12,
            sliding_window=WINDOW,
            query_pre_attn_scalar=10,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=3.0,
        )
    ),
}


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = FAMILIES[family]().to(dtype).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    model.generation_config.eos_token_id = None  # Greedy decoding runs its full length.
    model.generation_config.pad_token_id = 0
    return model


def save_model(family: str, directory: Path, **kwargs) -> transformers.PreTrainedModel:
    model = make_model(family, **kwargs)
    model.save_pretrained(directory)
    return model


def logits(model: transformers.PreTrainedModel, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def greedy(model: transformers.PreTrainedModel, ids, new_tokens: int):
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1] :].numpy()
