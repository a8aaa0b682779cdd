"""Writes a tiny, randomly initialised Llama-style model and a word-level tokenizer to a
directory, offline (no hub access): the model kvferry's end-to-end tests serve with vLLM on CPU.

usage: python make_tiny_model.py OUT_DIR [--seed N] [--layers L] [--kv-heads H] [--sliding W] [--gdn]

By default 3 layers, 4 query heads and 2 KV heads of size 64 (the CPU attention needs a supported
head size), float32 so that outputs compare exactly, a fixed seed so every run writes the same
weights; another seed makes other weights of the same shape (a "new checkpoint"), other layer
and head counts another geometry. `--sliding W` makes a hybrid model: layers alternate sliding-window
(window W) and full attention, as gpt-oss and Gemma 3 do, so vLLM's hybrid KV cache manager
gives it two KV cache groups. `--gdn` makes a tiny Qwen3-Next instead: layers alternate Gated
DeltaNet (linear attention, a Mamba-kind state) and full attention, with 4 small experts; vLLM's
CPU build runs it in bfloat16 only, with 256-token blocks (its Mamba "align" mode).
"""
import os
import sys

VOCAB = 2000


def arg(name, default):
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main():
    out = sys.argv[1]
    seed, layers, kv_heads = arg("--seed", 1234), arg("--layers", 3), arg("--kv-heads", 2)
    sliding = arg("--sliding", 0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(VOCAB - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    if "--gdn" in sys.argv:
        return save(gdn_model(layers), out)
    hybrid = {}
    if sliding:
        # vLLM's Llama reads `layer_types`; transformers' own Llama ignores it (the weights are
        # the same either way).
        hybrid = {
            "sliding_window": sliding,
            "layer_types": [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
            ],
        }
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=max(4, kv_heads),
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        tie_word_embeddings=False,
        **hybrid,
    )
    save(LlamaForCausalLM(cfg), out)


def gdn_model(layers):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    cfg = Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=max(layers, 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        decoder_sparse_step=1,
        full_attention_interval=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
        tie_word_embeddings=False,
    )
    return Qwen3NextForCausalLM(cfg)


def save(model, out):
    import torch

    model = model.to(torch.float32)
    # Larger random weights than the default init keep greedy outputs from collapsing into one
    # repeated token, so a wrong KV block changes the text.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    print(out)


if __name__ == "__main__":
    main()
