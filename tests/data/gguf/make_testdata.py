#!/usr/bin/env python3
"""Writes the GGUF test data in this folder with llama.cpp's own Python package (`gguf` on PyPI).

  quants.gguf            one small tensor per supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
                         Q4_K, Q6_K) and metadata of every GGUF value type; alignment 64
  quants.expected.json   per tensor: name, type, PyTorch shape, float offset into quants.expected.bin;
                         the metadata values
  quants.expected.bin    little-endian float32: every tensor as gguf.quants.dequantize() returns it
  llama_qk.gguf          Q/K weights and biases permuted as convert_hf_to_gguf.py does (4 heads, 2 kv
                         heads); llama_qk.expected.bin: the original (Hugging Face order) float32 values
  smollm2_q4_1.json      (with --model FILE) for every tensor of the real SmolLM2 GGUF: float64 sum,
                         sum of squares and sampled values of gguf's dequantisation; tokenizer facts

Run from the repository root:  python tests/data/gguf/make_testdata.py [--model PATH.gguf]
Needs: pip install gguf numpy. Deterministic (fixed seed).
"""
import argparse, hashlib, json, os, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

HERE = os.path.dirname(os.path.abspath(__file__))


def raw_blocks(rng, qtype, rows, cols):
    """Random block bytes with sane f16 scale fields, for types gguf-py cannot quantise."""
    bsize, tsize = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // bsize
    blocks = rng.integers(0, 256, size=(nblocks, tsize), dtype=np.uint8)
    def put_f16(off, values):
        blocks[:, off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(nblocks, 2)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        put_f16(0, rng.uniform(-0.05, 0.05, nblocks))
        put_f16(2, rng.uniform(0, 0.05, nblocks))
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        put_f16(208, rng.uniform(-0.01, 0.01, nblocks))
    return blocks.reshape(rows, cols // bsize * tsize)


def write_quants(rng):
    w = gguf.GGUFWriter(os.path.join(HERE, "quants.gguf"), arch="testarch")
    w.add_custom_alignment(64)
    meta = {
        "test.u8": ("uint8", 200), "test.i8": ("int8", -100), "test.u16": ("uint16", 60000),
        "test.i16": ("int16", -30000), "test.u32": ("uint32", 4000000000),
        "test.i32": ("int32", -2000000000), "test.u64": ("uint64", 2**40 + 1),
        "test.i64": ("int64", -(2**40) - 1), "test.f32": ("float32", 0.25),
        "test.f64": ("float64", -1.0e-300), "test.bool": ("bool", True),
        "test.string": ("string", "héllo wörld"),
    }
    for key, (kind, val) in meta.items():
        getattr(w, "add_" + kind)(key, val)
    w.add_array("test.strings", ["a", "", "ccc"])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, -1.5])
    expected = {"metadata": {k: v for k, (_, v) in meta.items()}, "tensors": []}
    expected["metadata"].update({"test.strings": ["a", "", "ccc"], "test.ints": [1, -2, 3],
                                 "test.floats": [0.5, -1.5], "general.architecture": "testarch",
                                 "general.alignment": 64})
    floats = []
    # name, type, PyTorch shape (rows, cols); a 3-D one checks the dims order
    cases = [("f32", Q.F32, (3, 64)), ("f16", Q.F16, (2, 3, 64)), ("bf16", Q.BF16, (3, 64)),
             ("q8_0", Q.Q8_0, (4, 96)), ("q4_0", Q.Q4_0, (4, 96)), ("q4_1", Q.Q4_1, (4, 96)),
             ("q4_k", Q.Q4_K, (3, 512)), ("q6_k", Q.Q6_K, (3, 512)), ("vec_q8_0", Q.Q8_0, (64,))]
    for name, qtype, shape in cases:
        x = rng.normal(0, 1, size=shape).astype(np.float32)
        if qtype == Q.F16:
            x.flat[:4] = [6.0e-8, -1.0e-5, 65504.0, 0.0]  # subnormals and the largest half
        if qtype in (Q.Q4_K, Q.Q6_K):
            data = raw_blocks(rng, qtype, int(np.prod(shape[:-1])), shape[-1])
        else:
            data = gguf.quants.quantize(x, qtype) if qtype not in (Q.F32, Q.F16) else x.astype(
                np.float16 if qtype == Q.F16 else np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        deq = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(-1)
        expected["tensors"].append({"name": name, "type": qtype.name, "shape": list(shape),
                                    "offset": sum(len(f) for f in floats)})
        floats.append(deq)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.concatenate(floats).astype("<f4").tofile(os.path.join(HERE, "quants.expected.bin"))
    with open(os.path.join(HERE, "quants.expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def llama_permute(weights, n_head, n_head_kv):
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py (applied to q_proj and k_proj)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_permuted(rng):
    """llama_qk.gguf: Q/K (weights and biases) permuted as the converter does; the expected file
    holds the Hugging Face (unpermuted) values: q.weight, q.bias, k.weight, k.bias."""
    heads, kv_heads, hidden, head_dim = 4, 2, 32, 8
    w = gguf.GGUFWriter(os.path.join(HERE, "llama_qk.gguf"), arch="llama")
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_embedding_length(hidden)
    hf = {"q.weight": rng.normal(size=(heads * head_dim, hidden)).astype(np.float32),
          "q.bias": rng.normal(size=(heads * head_dim,)).astype(np.float32),
          "k.weight": rng.normal(size=(kv_heads * head_dim, hidden)).astype(np.float32),
          "k.bias": rng.normal(size=(kv_heads * head_dim,)).astype(np.float32)}
    w.add_tensor("blk.0.attn_q.weight", llama_permute(hf["q.weight"], heads, heads))
    w.add_tensor("blk.0.attn_q.bias", llama_permute(hf["q.bias"], heads, heads))
    w.add_tensor("blk.0.attn_k.weight", llama_permute(hf["k.weight"], heads, kv_heads))
    w.add_tensor("blk.0.attn_k.bias", llama_permute(hf["k.bias"], heads, kv_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    np.concatenate([v.reshape(-1) for v in hf.values()]).astype("<f4").tofile(
        os.path.join(HERE, "llama_qk.expected.bin"))


def describe_model(path):
    r = gguf.GGUFReader(path)
    out = {"file": os.path.basename(path), "tensors": []}
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        flat = deq.reshape(-1).astype(np.float64)
        idx = np.random.default_rng(len(out["tensors"])).integers(0, flat.size, 16)
        out["tensors"].append({
            "name": t.name, "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape)],  # PyTorch order
            "sum": float(flat.sum()), "sumsq": float((flat * flat).sum()),
            "first": [float(v) for v in flat[:8]],
            "sample_index": [int(i) for i in idx], "sample": [float(flat[i]) for i in idx]})
    f = lambda k: r.fields[k].contents()
    tokens, merges, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.merges"), f("tokenizer.ggml.token_type")
    tmpl = f("tokenizer.chat_template")
    out["tokenizer"] = {
        "model": f("tokenizer.ggml.model"), "pre": f("tokenizer.ggml.pre"),
        "num_tokens": len(tokens), "num_merges": len(merges),
        "tokens": {str(i): tokens[i] for i in (0, 1, 2, 3, 17, 198, 1000, 20000, len(tokens) - 1)},
        "merges": {str(i): merges[i] for i in (0, 1, 100, len(merges) - 1)},
        "token_type_counts": {str(k): int(v) for k, v in zip(*np.unique(types, return_counts=True))},
        "bos": f("tokenizer.ggml.bos_token_id"), "eos": f("tokenizer.ggml.eos_token_id"),
        "unk": f("tokenizer.ggml.unknown_token_id"), "pad": f("tokenizer.ggml.padding_token_id"),
        "add_bos": f("tokenizer.ggml.add_bos_token"),
        "chat_template_sha256": hashlib.sha256(tmpl.encode()).hexdigest(),
        "chat_template_length": len(tmpl.encode())}
    with open(os.path.join(HERE, "smollm2_q4_1.json"), "w") as fo:
        json.dump(out, fo, separators=(",", ":"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    write_quants(np.random.default_rng(8))
    write_permuted(np.random.default_rng(9))
    if args.model:
        describe_model(args.model)
    print("gguf", gguf.__file__, file=sys.stderr)
