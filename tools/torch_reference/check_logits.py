"""Checks our model's logits against the PyTorch reference (tools/torch_reference/model.py).

    rlhf logits --checkpoint CKPT --sequences tools/torch_reference/sequences.jsonl --out OURS.json
    python3 tools/torch_reference/check_logits.py --checkpoint CKPT --ours OURS.json \
        [--device cuda] [--dtype float32|bfloat16] [--perturb NAME]

For every sequence of OURS.json it runs the reference on the same tokens and compares
  - the experts each MoE layer chose at each position (as sets): a different choice is a
    routing flip, reported and counted as a failure;
  - the full log-softmax rows over all positions and the whole vocabulary;
  - the next-token logprobs (ours from the learner's log_softmax_gather);
  - the reference's own KV-cache decode (prefill half, then one token at a time) against ours.
It prints max and mean absolute differences, a JSON summary as the last line, and exits 1
when a difference exceeds the tolerance of the chosen dtype (TOLERANCE below says why each is
what it is). --perturb adds 1e-2 to the first element of one weight: the
check must then fail, which shows it can.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import KVCache, ReferenceModel  # noqa: E402

# float32: max |d logprob| over every position and vocabulary entry, and no routing flip. Two
# float32 implementations with different summation orders (OpenBLAS vs MKL/cuBLAS, our
# polynomial exp vs libm) differ by a few ulp per op; over 3-4 layers, |logit| up to 13 and a
# 262-way softmax, the reference measured up to 1.7e-5 (docs/torch_reference.md). 5e-5
# leaves ~3x for other libraries, while a +1e-2 change to one element of one expert's w_down
# in the last layer already moves the logprobs by 1.1e-4.
# bfloat16 (8 significant bits, 4e-3 relative per rounding) is a sanity bound only: the
# residual stream's rounding flips near-tied router choices and moves the far tail of the
# softmax by whole units, so it bounds the MEAN |d| of the next-token logprobs (measured ~0.02
# on the CPU) and reports flips without failing on them.
TOLERANCE = {"float32": 5e-5, "bfloat16": 0.05}


def stats(diff: torch.Tensor):
    return float(diff.abs().max()), float(diff.abs().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ours", required=True, help="JSON written by `rlhf logits`")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--tolerance", type=float, help="override the dtype's tolerance")
    parser.add_argument("--perturb", help="weight name whose first element gets +1e-2")
    args = parser.parse_args(argv)

    # Parity needs true float32 products: TF32 (10-bit mantissa) would be a bf16-class error.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[args.dtype]
    model = ReferenceModel.from_checkpoint(args.checkpoint, args.device, dtype)
    if args.perturb:
        model.w[args.perturb].view(-1)[0] += 1e-2
    with open(args.ours) as f:
        ours = json.load(f)
    if ours["vocab_size"] != model.config.vocab_size:
        raise SystemExit(f"vocab {ours['vocab_size']} in {args.ours} != {model.config.vocab_size}")

    flips = positions = 0
    row_diffs, target_diffs, decode_diffs = [], [], []
    for seq in ours["sequences"]:
        tokens = torch.tensor(seq["tokens"], device=args.device)[None]
        T = tokens.shape[1]
        our_logits = torch.tensor(seq["logits"], dtype=torch.float64)  # [T, V]
        logits, routing = model.forward(tokens)
        logits = logits[0].double().cpu()
        positions += T
        for m, chosen in enumerate(routing):
            mine = chosen.sort(-1).values.cpu()
            theirs = torch.tensor(seq["expert_ids"][m]).sort(-1).values
            flips += int((mine != theirs).any(-1).sum())
        row_diffs.append((logits.log_softmax(-1) - our_logits.log_softmax(-1)).flatten())
        if T > 1:
            target = torch.tensor(seq["tokens"][1:])
            mine = logits.log_softmax(-1)[:-1].gather(1, target[:, None])[:, 0]
            target_diffs.append(mine - torch.tensor(seq["logprobs"], dtype=torch.float64))
            # KV-cache decode: prefill the first half, then one position per call.
            cache = KVCache(model.config, 1, T, dtype, args.device)
            half = max(1, T // 2)
            parts = [model.forward(tokens[:, :half], cache)[0][0]]
            for t in range(half, T):
                parts.append(model.forward(tokens[:, t:t + 1], cache)[0][0])
            decoded = torch.cat(parts).double().cpu()
            decode_diffs.append((decoded.log_softmax(-1) - our_logits.log_softmax(-1)).flatten())

    row_max, row_mean = stats(torch.cat(row_diffs))
    target_max, target_mean = stats(torch.cat(target_diffs))
    decode_max, decode_mean = stats(torch.cat(decode_diffs))
    if args.dtype == "float32":
        ok = flips == 0 and max(row_max, target_max, decode_max) <= tolerance
    else:
        ok = target_mean <= tolerance
    print(f"checkpoint {args.checkpoint}: {len(ours['sequences'])} sequences, {positions} "
          f"positions, device {args.device}, {args.dtype}"
          + (f", perturbed {args.perturb}" if args.perturb else ""))
    print(f"  routing flips (positions x MoE layers whose expert set differs): {flips}")
    print(f"  log-softmax rows, all positions x V:   max |d| {row_max:.3e}  mean {row_mean:.3e}")
    print(f"  next-token logprobs vs ours:           max |d| {target_max:.3e}  mean {target_mean:.3e}")
    print(f"  reference KV-cache decode vs ours:     max |d| {decode_max:.3e}  mean {decode_mean:.3e}")
    bound = "max |d|, no flip" if args.dtype == "float32" else "mean |d| of next-token logprobs"
    print(f"  tolerance {tolerance:.1e} on {bound}: {'PASS' if ok else 'FAIL'}")
    print(json.dumps({"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
                      "torch": torch.__version__, "perturb": args.perturb,
                      "sequences": len(ours["sequences"]), "positions": positions,
                      "routing_flips": flips, "logprob_rows_max_abs": row_max,
                      "logprob_rows_mean_abs": row_mean, "target_logprob_max_abs": target_max,
                      "target_logprob_mean_abs": target_mean, "decode_max_abs": decode_max,
                      "decode_mean_abs": decode_mean, "tolerance": tolerance, "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
