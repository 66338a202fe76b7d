"""Tiny random models of each family the GPU presets name, built locally (no download), so every family runs end
to end on a CPU in seconds: `model=tiny model.tiny.family=llama|llama3|gemma2|qwen2`.

Each family is a small class: its tokenizer (byte-level, no merges, with the special tokens and BOS behaviour of
that family's real tokenizer) and its transformers config class at the size `model.tiny` gives.
- llama: today's tiny Llama (no BOS, pad = EOS), the default, unchanged;
- llama3: Llama-3 style: `<|begin_of_text|>` added by default, no pad token, untied LM head, rope_theta 500k;
- gemma2: Gemma-2: its config class (soft-capping, sliding window, eager attention, tied embeddings, the
  embedding normaliser), `<bos>` added by default, a real `<pad>`;
- qwen2: Qwen2: q/k/v biases, its own pad token `<|endoftext|>`, no BOS.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

TINY_SEED = 0  # the tiny base model is the same for every experiment; cfg.seed only drives training


def byte_level_tokenizer(specials: tuple[str, ...] = (), bos: str | None = None, eos: str = "<eos>",
                         pad: str | None = "<eos>", add_bos: bool = False, specials_first: bool = False):
    """A 256-symbol byte-level BPE tokenizer with no merges (covers any text, needs no download), plus `specials`
    (before the bytes with `specials_first`, as Gemma numbers them, else after); with `add_bos` it puts `bos`
    before every text by default, as Llama-3's and Gemma's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [*specials, *alphabet] if specials_first else [*alphabet, *specials]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.add_special_tokens(list(specials))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad)


class TinyFamily:
    """A family's tokenizer and config; `build` saves a random model of it with its tokenizer."""

    config_class: str = "LlamaConfig"

    def tokenizer(self):
        raise NotImplementedError

    def config_kwargs(self, tokenizer) -> dict:
        return {}

    def build(self, folder: Path, dims: dict) -> None:
        import transformers

        tokenizer = self.tokenizer()
        config = getattr(transformers, self.config_class)(vocab_size=len(tokenizer), max_position_embeddings=4096,
                                                          **self.config_kwargs(tokenizer), **dims)
        torch.manual_seed(TINY_SEED)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


class Llama(TinyFamily):
    def tokenizer(self):
        return byte_level_tokenizer(("<eos>",))

    def config_kwargs(self, tokenizer) -> dict:
        return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


class Llama3(TinyFamily):
    def tokenizer(self):
        return byte_level_tokenizer(("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"), bos="<|begin_of_text|>",
                                    eos="<|end_of_text|>", pad=None, add_bos=True)

    def config_kwargs(self, tokenizer) -> dict:
        return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "rope_theta": 500000.0, "tie_word_embeddings": False}


class Gemma2(TinyFamily):
    config_class = "Gemma2Config"

    def tokenizer(self):
        return byte_level_tokenizer(("<pad>", "<eos>", "<bos>", "<unk>"), bos="<bos>", eos="<eos>", pad="<pad>",
                                    add_bos=True, specials_first=True)

    def config_kwargs(self, tokenizer) -> dict:
        return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, "head_dim": 16, "query_pre_attn_scalar": 16,
                "sliding_window": 32, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "tie_word_embeddings": True}


class Qwen2(TinyFamily):
    config_class = "Qwen2Config"

    def tokenizer(self):
        return byte_level_tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                                    pad="<|endoftext|>")

    def config_kwargs(self, tokenizer) -> dict:
        return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "tie_word_embeddings": True}


FAMILIES: dict[str, TinyFamily] = {"llama": Llama(), "llama3": Llama3(), "gemma2": Gemma2(), "qwen2": Qwen2()}


def build_tiny(folder: Path, tiny_cfg: DictConfig) -> None:
    """A random model of `model.tiny.family` at the size `model.tiny` gives, saved with its tokenizer."""
    dims = OmegaConf.to_container(tiny_cfg, resolve=True)
    FAMILIES[dims.pop("family", "llama")].build(folder, dims)
