"""Write a llama.cpp GGUF from the benchmark's ternary Llama weights, then quantize it.

Runs in the llama.cpp virtual environment (benchmarks/llamacpp/setup.sh): numpy, gguf,
safetensors and llama-cpp-python, no torch.

    python write_gguf.py base  --weights model.safetensors --out base.gguf
    python write_gguf.py quant --base base.gguf --type TQ2_0 --out tq2_0.gguf [--head f32]

Input (written by benchmarks/e2e.py from `lowbit.generate`'s preset tensors): a safetensors
file with `lowbit.models.TinyLlama` names; the seven linears of each block as int8 ternary
codes `<name>` plus a one-element fp32 `<name>.scale` (a power of two), everything else fp32;
the LlamaConfig as JSON in the metadata key "lowbit.config".

`base` writes the ternary linears as F16 (`codes * scale` is exact in fp16) and the
embedding, head and norms as F32, in the llama architecture. lowbit's models apply rotary
embeddings HF-style (rotate_half over two halves of each head); llama.cpp's llama
architecture rotates adjacent pairs, so wq and wk rows are permuted per head exactly as
llama.cpp's convert_hf_to_gguf does (a row permutation: still the same ternary values and
scale). The vocabulary is a placeholder SentencePiece list (<unk>, <s>, </s>, 256 byte
tokens, then `t<i>`): the benchmark feeds token ids, never text.

`quant` calls llama.cpp's own quantizer (`llama_model_quantize`). TQ1_0/TQ2_0 store one
fp16 scale per 256-block, so ternary blocks with one power-of-two scale quantize losslessly;
by default llama.cpp then uses Q4_K for the embedding and Q6_K for the output head.
`--head f32|f16` keeps the head (and embedding) at that type instead.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

LINEARS = {  # lowbit.models name -> GGUF name (per block)
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
NORMS = {"attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight"}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rotary layout -> llama.cpp adjacent pairs (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_base(weights: str, out: str) -> None:
    import gguf
    from safetensors import safe_open

    with safe_open(weights, framework="numpy") as f:
        meta = f.metadata() or {}
        if "lowbit.config" not in meta:
            raise SystemExit(f"{weights}: no 'lowbit.config' metadata; not written by benchmarks/e2e.py")
        cfg = json.loads(meta["lowbit.config"])
        n_head, n_kv, dim, layers = cfg["n_heads"], cfg["n_kv_heads"], cfg["dim"], cfg["n_layers"]
        vocab = cfg["vocab_size"]
        w = gguf.GGUFWriter(out, "llama")
        w.add_name(meta.get("lowbit.name", "lowbit-ternary-llama"))
        w.add_context_length(int(meta.get("lowbit.context", 4096)))
        w.add_embedding_length(dim)
        w.add_block_count(layers)
        w.add_feed_forward_length(cfg["hidden_dim"])
        w.add_rope_dimension_count(dim // n_head)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(cfg["norm_eps"])
        w.add_rope_freq_base(cfg["rope_theta"])
        w.add_vocab_size(vocab)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

        tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
        tokens += [f"t{i}".encode() for i in range(len(tokens), vocab)]
        if len(tokens) != vocab:
            raise SystemExit(f"vocab {vocab} is too small for the placeholder tokenizer (needs >= 259)")
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * vocab)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)

        def f32(name: str) -> np.ndarray:
            return np.ascontiguousarray(f.get_tensor(name).astype(np.float32))

        w.add_tensor("token_embd.weight", f32("tok_embeddings.weight"))
        for i in range(layers):
            for src, dst in NORMS.items():
                w.add_tensor(f"blk.{i}.{dst}", f32(f"layers.{i}.{src}"))
            for src, dst in LINEARS.items():
                name = f"layers.{i}.{src}"
                codes = f.get_tensor(name)
                scale = float(f.get_tensor(name + ".scale").reshape(-1)[0])
                if codes.dtype != np.int8 or codes.min() < -1 or codes.max() > 1:
                    raise SystemExit(f"{name}: expected int8 ternary codes, got {codes.dtype} "
                                     f"in [{codes.min()}, {codes.max()}]")
                t = codes.astype(np.float16) * np.float16(scale)
                if not np.array_equal(t.astype(np.float32), codes.astype(np.float32) * np.float32(scale)):
                    raise SystemExit(f"{name}: codes * {scale} is not exact in fp16")
                if src == "attention.wq.weight":
                    t = permute_rope(t, n_head)
                elif src == "attention.wk.weight":
                    t = permute_rope(t, n_kv)
                w.add_tensor(f"blk.{i}.{dst}", np.ascontiguousarray(t))
        w.add_tensor("output_norm.weight", f32("norm.weight"))
        w.add_tensor("output.weight", f32("output.weight"))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    print(json.dumps({"written": out}))


QTYPES = {"TQ1_0": "LLAMA_FTYPE_MOSTLY_TQ1_0", "TQ2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
GGML_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q6_k": "GGML_TYPE_Q6_K"}


def quantize(base: str, qtype: str, out: str, head: str | None, threads: int) -> None:
    import llama_cpp
    if qtype not in QTYPES:
        raise SystemExit(f"--type must be one of {sorted(QTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QTYPES[qtype])
    params.nthread = threads
    if head is not None:
        t = getattr(llama_cpp, GGML_TYPES[head])
        params.output_tensor_type = t
        params.token_embedding_type = t
    rc = llama_cpp.llama_model_quantize(base.encode(), out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({qtype}) failed with {rc}")
    print(json.dumps({"written": out, "type": qtype, "head": head}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("--weights", required=True)
    b.add_argument("--out", required=True)
    q = sub.add_parser("quant")
    q.add_argument("--base", required=True)
    q.add_argument("--type", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--head", choices=sorted(GGML_TYPES))
    q.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd == "base":
        write_base(args.weights, args.out)
    else:
        quantize(args.base, args.type, args.out, args.head, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
