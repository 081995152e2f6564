"""End-to-end decode on a Llama-3-8B-shaped model: dense vs persona masks, and persona switching.

Real layer shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads), random weights, as many
decoder layers as asked for (--layers; memory decides), a 32k vocabulary. For each sparsity:
tokens/s at batch 1 with the dispatcher's choice, the speed-up over dense measured in the same
run, the cost of one persona switch per layer, a batch whose sequences carry different personas
(shared bitmask, against dense at the same batch), and the memory of N resident personas in the
shared-bitmask format as a fraction of the dense weight bytes.

  python benchmarks/bench_e2e_decode.py --layers 2 --tokens 128
  python benchmarks/bench_e2e_decode.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.app.bench import bench_mixed_batch, bench_model, magnitude_masks  # noqa: E402
from persona_kernels.formats import SharedBitmask  # noqa: E402
from persona_kernels.masks import linear_weight  # noqa: E402

from common import machine, print_table  # noqa: E402


def llama3_8b_shaped(layers: int, dtype, device, quick=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def shared_bitmask_memory(model, personas: int) -> float:
    """Bytes of N personas' bits over the dense weight bytes of the masked layers."""
    store = magnitude_masks(model, 0.5, personas=[f"p{i}" for i in range(personas)])
    mods = dict(model.named_modules())
    bits = dense = 0
    for layer in store.layers[:4]:  # a few layers are enough for the ratio
        w = linear_weight(mods[layer]).detach()
        masks = torch.stack([store.mask(p, layer) for p in store.personas]).to(w.device)
        fmt = SharedBitmask.from_dense(w, masks)
        bits += fmt.bits.numel() * 4
        dense += fmt.dense_nbytes()
    return bits / dense


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--personas", type=int, default=8, help="resident personas for the memory figure")
    ap.add_argument("--mixed-batch", type=int, default=4,
                    help="also time a batch of this many sequences with mixed personas (0: skip)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = llama3_8b_shaped(1 if args.quick else args.layers, dtype, args.device, args.quick)
    tokens = 8 if args.quick else args.tokens
    print(f"# end-to-end decode on {machine()}: Llama-3-8B-shaped, {args.layers} layers, {dtype}, batch 1, {tokens} tokens")
    rows = bench_model(model, [float(s) for s in args.sparsities.split(",")], tokens=tokens, device=args.device)
    table = [dict(sparsity=f"{r['sparsity']:.0%}", format=r["format"], tokens_per_s=f"{r['tokens_per_s']:.2f}",
                  speedup=f"{r['speedup']:.2f}", switch_ns=f"{r.get('switch_ns', 0):.0f}")
             for r in rows]
    print_table(table, ["sparsity", "format", "tokens_per_s", "speedup", "switch_ns"])
    if args.mixed_batch:
        mixed = bench_mixed_batch(model, float(args.sparsities.split(",")[0]), args.mixed_batch,
                                  tokens=tokens, device=args.device)
        rows.append(mixed)
    frac = shared_bitmask_memory(model, args.personas)
    print(f"\n{args.personas} resident personas (shared bitmask): {frac:.4f} of the dense weight bytes "
          f"(bound N/16 = {args.personas / 16:.4f} for bf16, N/32 = {args.personas / 32:.4f} for fp32)")
    return rows


if __name__ == "__main__":
    main()
