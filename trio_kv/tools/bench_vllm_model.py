"""A tiny random-weight Llama and a word-level tokenizer, written to a directory. Nothing downloaded.

Used by ``trio-kv bench vllm``: vLLM loads the directory as it would a model
from a hub. Needs ``transformers`` and ``tokenizers`` (both come with vLLM).
"""

from __future__ import annotations

import json
import os

VOCAB_SIZE = 512


def build_tiny_llama(directory: str, *, layers: int = 6, seed: int = 0) -> str:
    """Write the model and tokenizer into ``directory`` (created if missing); return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,  # head size 64, one the CPU attention kernels support
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init: outputs depend on the KV
            parameter.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB_SIZE)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    with open(os.path.join(directory, "trio_kv_tiny_model.json"), "w") as marker:
        json.dump({"layers": layers, "seed": seed, "vocab_size": VOCAB_SIZE}, marker)
    return directory
