"""GGUF export: a merged model as one file that llama.cpp (and the tools built on it) runs as it is.

GGUF is llama.cpp's format: a header of typed key/value metadata (architecture, shapes, RoPE, the
whole tokenizer and its chat template), then the tensors, each in its own type. The file is written
with the `gguf` package that llama.cpp maintains, so the key names and encodings are its own.

Read top to bottom (the tensor names, blk.N.attn_q and so on, are checkpoint.py's name table):
  TYPES          the weight types offered, by name
  write_gguf     metadata, tokenizer, tensors: the file (the language model: a classification head
                 has no GGUF tensor, and is left out with a note)
  _tensor        one tensor in f32 / f16 / bf16 / q8_0 (norms and RoPE factors always f32)
  _tokenizer     the vocabulary as llama.cpp reads it: byte-level BPE (Llama 3) or sentencepiece
The q/k rows stay in Meta's interleaved RoPE order: that is the order llama.cpp's kernels rotate
(its own HF converter permutes HF weights back to it).
"""

import dataclasses
import sys

import numpy as np
import torch

import tokenizer
from checkpoint import gguf_name
from model import rope_frequencies

# --gguf_type -> (the tensors' gguf.GGMLQuantizationType, the file's gguf.LlamaFileType), by name
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def write_gguf(model, state_dict, tok, path, weight_type="f16", name="llama"):
    """model's weights (state_dict in our names, adapters merged), its shape and tok into a GGUF
    file at path (inside a directory being filled: see lora.py export)."""
    import gguf  # llama.cpp's package, needed by this export only: imported when it runs

    args = model.args
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[weight_type][0])
    file_type = getattr(gguf.LlamaFileType, TYPES[weight_type][1])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    _tokenizer(writer, tok, args.vocab_size)

    for key, t in state_dict.items():
        if key == "output.weight" and model.tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if gguf_name(key) is None:  # the head: llama.cpp would read a cls tensor as a reranker's
            print(f"gguf_export: the classification head ({key}, {args.n_labels} labels) is not in the GGUF, "
                  f"which holds the language model only (llama.cpp has no such head)", file=sys.stderr)
            continue
        _tensor(writer, gguf_name(key), t, qtype)
    if args.use_scaled_rope:
        # Llama 3.1's frequency scaling, as llama.cpp takes it: per-pair divisors of the base frequencies
        plain = rope_frequencies(dataclasses.replace(args, use_scaled_rope=False))
        _tensor(writer, "rope_freqs.weight", plain / rope_frequencies(args), gguf.GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor(writer, name, t, qtype):
    """One tensor: vectors (norms, RoPE factors) in f32, as llama.cpp computes them; matrices in
    qtype, except q8_0 rows that are not a whole number of its 32-value blocks, which stay f16."""
    import gguf  # see write_gguf

    data = t.detach().to("cpu", torch.float32).numpy()
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16 or (qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32):
        writer.add_tensor(name, data.astype(np.float16))
    else:  # bf16 and q8_0 are byte blocks; the writer needs the logical type to record the shape
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _tokenizer(writer, tok, vocab_size):
    """The vocabulary, special ids and chat template, in llama.cpp's keys; one entry per embedding
    row, rows past the tokenizer's (an embedding padded to a round size) as unused padding tokens."""
    import gguf  # see write_gguf

    pad = [f"[PAD{i}]" for i in range(tok.n_words, vocab_size)]
    if tok.kind == "llama3":
        alphabet = tokenizer.byte_alphabet()
        spell = lambda piece: "".join(alphabet[b] for b in piece)  # noqa: E731
        tokens = [""] * tok.n_words
        types = [gguf.TokenType.UNUSED] * tok.n_words
        for piece, rank in tok.ranks.items():
            tokens[rank], types[rank] = spell(piece), gguf.TokenType.NORMAL
        for text, i in tok.special.items():
            tokens[i], types[i] = text, gguf.TokenType.CONTROL
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")  # llama.cpp's name for Meta's Llama 3 split regex
        writer.add_token_list(tokens + pad)
        writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(pad))
        writer.add_token_merges([f"{spell(a)} {spell(b)}" for a, b in tokenizer.bpe_merges(tok.ranks)])
        writer.add_eot_token_id(tok.eot_id)
        if "<|eom_id|>" in tok.special:
            writer.add_eom_token_id(tok.special["<|eom_id|>"])
    else:
        sp = tok.model
        kinds = [(sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
                 (sp.is_byte, gguf.TokenType.BYTE), (sp.is_unused, gguf.TokenType.UNUSED)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(tok.n_words)] + pad)
        writer.add_token_scores([sp.get_score(i) for i in range(tok.n_words)] + [-1e9] * len(pad))
        writer.add_token_types([next((k for test, k in kinds if test(i)), gguf.TokenType.NORMAL)
                                for i in range(tok.n_words)] + [gguf.TokenType.UNUSED] * len(pad))
        if sp.unk_id() >= 0:
            writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.hf_tokenizer_config(tok)["chat_template"])
