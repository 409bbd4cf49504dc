"""Tiny random models, one per architecture in core.arch's table, built from configs (no downloads).

``tests/test_adapters.py`` fails for a row of the table without a config here."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128

CONFIGS = {
    "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                      attention_types=[[["global", "local"], 1]], max_position_embeddings=128),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` in eval mode, fp32, token ids 0..127, no dropout."""
    cfg = CONFIGS[arch]()
    cfg.bos_token_id = cfg.eos_token_id = 1
    cfg.pad_token_id = 0
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "dropout", "activation_dropout", "resid_dropout", "embed_dropout", "attention_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, 0.0)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def toy_batch(seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    """A batch with one left-padded row; labels mask the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE tokenizer (a few hundred tokens) trained in memory on arithmetic-ish text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request. ### Instruction: ### Input: ### Response: The answer is 0 1 2 3 4 5 6 7 8 9 . , "
              "how many apples does Tom have? He buys more and gives some away, plus minus times total left."] * 4
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_checkpoint(directory, seed: int = 0):
    """Save a tiny LlamaForCausalLM + tokenizer to ``directory`` (a hub-style local checkpoint)."""
    from pathlib import Path

    directory = Path(directory)
    tok = tiny_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    T.LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
