"""A tiny Llama with a real (small) byte-level BPE tokenizer, saved as a local model folder."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def _texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:150]


def make_tokenizer(vocab_size: int = 320) -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def make_model_folder(
    path: Path, *, seed: int = 0, tokenizer: tf.PreTrainedTokenizerFast | None = None
) -> Path:
    """The tiny Llama saved in ``path`` (with ``tokenizer``, default :func:`make_tokenizer`)."""
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
