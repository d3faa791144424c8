"""Times the PyTorch reference model as a PyTorch user would, for `rlhf bench --torch-reference`.

    python3 tools/torch_reference/bench.py generate --checkpoint CKPT [--batches 1,16,64,256]
        [--prompt-len 128] [--new-tokens 128] [--device auto|cpu|cuda] [--compile auto|on|off]
    python3 tools/torch_reference/bench.py train --checkpoint CKPT [--batch 16] [--seq-len 512]
        [--steps 20] [--warmup 3] [--lr 3e-3] ...

It prints one JSON object on stdout (or writes it to --out); progress goes to stderr.

The model is model.py's (same checkpoint, same function: a float32 parity check against
ReferenceModel runs first and must pass), written for speed the way a PyTorch user would:
  - BF16 weights and activations for generation; FP32 master weights under BF16 autocast with
    AdamW (fused on CUDA) and gradient clipping for training. The router stays FP32.
  - F.scaled_dot_product_attention (flash attention on the GPU) where torch has it (>= 2.0);
    an explicit softmax(q k^T) v before that.
  - RoPE from a precomputed table; a KV cache laid out [B, Hkv, S, hd] for SDPA.
  - MoE as DeepSeek-V3's reference inference code does it: tokens sorted by expert, per-expert
    counts read to the host once per MoE layer (bincount().tolist()), then one SwiGLU per expert
    with tokens.
  - Greedy decoding: argmax on the device, one token per sequence per step, no early stop.
  - torch.compile(model) where torch has it, around the MoE's expert loop (which runs eagerly:
    its shapes depend on the routing). Each shape is run eagerly and compiled, and the faster is
    reported (both are in the JSON). A failed compile falls back to eager with a note.
  - CUDA synchronisation around every timer; one untimed warm-up run of each shape first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ReferenceModel, load_checkpoint, rmsnorm, swiglu  # noqa: E402

# Float32 logits of the timed model against ReferenceModel's on the same tokens. Both are
# float32 with TF32 off; they differ only in summation order (SDPA, the expert loop's order),
# about 1e-6 on a random-init model. A different function (a wrong rope, a missing expert)
# moves logits by 1e-2 or more.
PARITY_TOLERANCE = 1e-3


def log(message: str) -> None:
    print(f"bench.py: {message}", file=sys.stderr, flush=True)


def prompt_tokens(batch: int, length: int, device) -> torch.Tensor:
    """The prompts `rlhf bench generate` uses too: token (b, t) = (31 b + 17 t + 5) mod 256."""
    b = torch.arange(batch, device=device)[:, None]
    t = torch.arange(length, device=device)[None, :]
    return (31 * b + 17 * t + 5) % 256


def _probe_sdpa():
    """(has SDPA, SDPA takes enable_gqa)."""
    if not hasattr(F, "scaled_dot_product_attention"):
        return False, False
    q, kv = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True, True
    except (TypeError, RuntimeError):
        return True, False


HAVE_SDPA, SDPA_GQA = _probe_sdpa()


def eager_only(fn):
    """Keeps torch.compile out of `fn`. The MoE's expert loop has data-dependent shapes (tokens
    per expert, often 0 or 1 in decode, which dynamo specializes on): compiled, it would
    recompile for nearly every routing pattern. A user compiles around it."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "disable"):
        return compiler.disable(fn)
    try:
        return importlib.import_module("torch._dynamo").disable(fn)
    except ImportError:  # torch 1.x: nothing compiles anyway
        return fn


class Cache:
    """Keys and values per layer, [B, Hkv, capacity, hd]: the layout SDPA reads without a copy."""

    def __init__(self, config, batch: int, capacity: int, dtype, device):
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]


class BenchModel(torch.nn.Module):
    """model.py's function, written for speed. The tensors are ReferenceModel's own (shared,
    not copied); they become Parameters so an optimizer can train them."""

    def __init__(self, ref: ReferenceModel, trainable: bool):
        super().__init__()
        c = self.config = ref.config
        self.weights = torch.nn.ParameterDict()
        self.w: Dict[str, torch.Tensor] = {}
        for name, tensor in ref.w.items():
            if name.endswith("router_bias"):  # the balancing bias is not trained by gradient
                self.register_buffer(name.replace(".", "__"), tensor)
                self.w[name] = tensor
            else:
                param = torch.nn.Parameter(tensor, requires_grad=trainable)
                self.weights[name.replace(".", "__")] = param
                self.w[name] = param
        # Angles in float64, as model.py's rope, kept as float32 tables [max_seq, hd / 2].
        hd = c.head_dim
        inv_freq = c.rope_theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        angle = torch.arange(c.max_seq_len, dtype=torch.float64)[:, None] * inv_freq
        device = ref.w["embed"].device
        self.register_buffer("rope_cos", angle.cos().float().to(device))
        self.register_buffer("rope_sin", angle.sin().float().to(device))

    def rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, T, H, hd] at positions start.. start + T - 1, pairs (2i, 2i+1) as model.py."""
        T = x.shape[1]
        cos = self.rope_cos[start:start + T][None, :, None, :].to(x.dtype)
        sin = self.rope_sin[start:start + T][None, :, None, :].to(x.dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    def attend(self, q, k, v, causal: bool) -> torch.Tensor:
        """q [B, Hq, T, hd], k/v [B, Hkv, S, hd] -> [B, Hq, T, hd]."""
        group = q.shape[1] // k.shape[1]
        if HAVE_SDPA and SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        if HAVE_SDPA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(-1).to(q.dtype) @ v

    def attention(self, layer: int, x: torch.Tensor, cache: Optional[Cache],
                  start: int) -> torch.Tensor:
        c, p = self.config, f"layers.{layer}."
        B, T, _ = x.shape
        q = (x @ self.w[p + "wq"].T).view(B, T, c.n_heads, c.head_dim)
        k = (x @ self.w[p + "wk"].T).view(B, T, c.n_kv_heads, c.head_dim)
        v = (x @ self.w[p + "wv"].T).view(B, T, c.n_kv_heads, c.head_dim)
        q, k = self.rope(q, start).transpose(1, 2), self.rope(k, start).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        # Several new tokens only ever come at position 0 here (training, prefill), where the
        # causal mask is SDPA's own; one new token reads every cached key.
        if T > 1 and start != 0:
            raise ValueError("bench model: several new tokens must start at position 0")
        out = self.attend(q, k, v, causal=T > 1)
        return out.transpose(1, 2).reshape(B, T, -1) @ self.w[p + "wo"].T

    @eager_only
    def moe(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        """Shared experts + top-k routed experts of f [N, D]."""
        c, p = self.config, f"layers.{layer}."
        with torch.autocast(device_type=f.device.type, enabled=False):
            scores = torch.sigmoid(f.float() @ self.w[p + "router"].T)  # [N, E], float32
        chosen = (scores + self.w[p + "router_bias"]).topk(c.top_k, dim=-1).indices
        chosen_scores = scores.gather(1, chosen)
        gates = c.route_scale * chosen_scores / chosen_scores.sum(-1, keepdim=True)  # [N, k]
        flat = chosen.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=c.n_routed_experts).tolist()  # host sync
        token = order // c.top_k
        rows = f[token].split(counts)
        ys = [swiglu(x, self.w[p + "experts.w_gate"][e], self.w[p + "experts.w_up"][e],
                     self.w[p + "experts.w_down"][e], c.clamp)
              for e, x in enumerate(rows) if counts[e] > 0]
        y = torch.cat(ys) * gates.flatten()[order, None].to(ys[0].dtype)
        out = torch.zeros(f.shape[0], f.shape[1], dtype=y.dtype, device=f.device)
        out = out.index_add(0, token, y)
        if c.n_shared_experts > 0:
            out = out + swiglu(f, self.w[p + "shared.w_gate"], self.w[p + "shared.w_up"],
                               self.w[p + "shared.w_down"], c.clamp)
        return out

    def forward(self, tokens: torch.Tensor, cache: Optional[Cache] = None,
                start: int = 0) -> torch.Tensor:
        """logits [B, T, V] for tokens [B, T] at positions start.. (appended to the cache)."""
        c = self.config
        B, T = tokens.shape
        x = self.w["embed"][tokens]
        for i in range(c.n_layers):
            p = f"layers.{i}."
            x = x + self.attention(i, rmsnorm(x, self.w[p + "attn_norm"], c.norm_eps), cache,
                                   start)
            f = rmsnorm(x, self.w[p + "ffn_norm"], c.norm_eps)
            if c.is_moe_layer(i):
                x = x + self.moe(i, f.reshape(B * T, -1)).view(B, T, -1)
            else:
                x = x + swiglu(f, self.w[p + "ffn.w_gate"], self.w[p + "ffn.w_up"],
                               self.w[p + "ffn.w_down"], c.clamp)
        return rmsnorm(x, self.w["final_norm"], c.norm_eps) @ self.w["lm_head"].T


# ---------------------------------------------------------------------------- helpers


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parity_check(config, weights, device: str) -> Dict[str, float]:
    """Float32 logits of BenchModel against ReferenceModel, full sequence and KV-cache decode."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = ReferenceModel(config, weights, device, torch.float32)
        model = BenchModel(ref, trainable=False)
        T = min(8, config.max_seq_len)
        tokens = prompt_tokens(2, T, device)
        with torch.no_grad():
            want = ref.forward(tokens)[0].float()
            full = model(tokens).float()
            cache = Cache(config, 2, T, torch.float32, device)
            half = max(1, T // 2)
            parts = [model(tokens[:, :half], cache, 0)]
            parts += [model(tokens[:, t:t + 1], cache, t) for t in range(half, T)]
            decoded = torch.cat(parts, dim=1).float()
        result = {"max_abs_logit_diff": float((full - want).abs().max()),
                  "decode_max_abs_logit_diff": float((decoded - want).abs().max()),
                  "max_abs_logit": float(want.abs().max()), "tolerance": PARITY_TOLERANCE}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    worst = max(result["max_abs_logit_diff"], result["decode_max_abs_logit_diff"])
    if not worst <= PARITY_TOLERANCE:
        raise SystemExit(f"bench.py: the timed model's float32 logits differ from "
                         f"ReferenceModel's by {worst:.3e} (> {PARITY_TOLERANCE:.0e}): it does "
                         f"not compute the reference's function")
    return result


class Compiler:
    """torch.compile when requested and available; remembers why it is not used."""

    def __init__(self, mode: str):
        self.requested = mode
        self.available = hasattr(torch, "compile")
        self.note = ""
        if mode == "off":
            self.note = "not requested (--compile off)"
        elif not self.available:
            self.note = f"torch {torch.__version__} has no torch.compile"
            if mode == "on":
                raise SystemExit(f"bench.py: --compile on, but {self.note}")
        if self.enabled():
            # Each batch size, prompt length and decode position can recompile until dynamo
            # marks the dimension dynamic, and every MoE layer's graph break starts one more
            # function; a low limit would drop some of them back to eager without a word.
            dynamo = importlib.import_module("torch._dynamo")
            for key in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, key):
                    setattr(dynamo.config, key, 256)

    def enabled(self) -> bool:
        return self.requested != "off" and self.available and not self.failed()

    def failed(self) -> bool:
        return self.note.startswith("failed")

    def fail(self, error: BaseException) -> None:
        if self.requested == "on":
            raise error
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.note = f"failed, eager only: {type(error).__name__}: {first[:300]}"
        log(f"torch.compile {self.note}")

    def describe(self) -> Dict[str, object]:
        return {"requested": self.requested, "available": self.available,
                "used": self.enabled(), "note": self.note}


def faster(runs: Dict[str, dict], key: str) -> str:
    """The mode whose `key` (a time) is smallest."""
    return min(runs, key=lambda mode: runs[mode][key])


# ---------------------------------------------------------------------------- generate


def time_generation(forward, config, batch: int, prompt_len: int, new_tokens: int, dtype,
                    device: str) -> Dict[str, float]:
    prompts = prompt_tokens(batch, prompt_len, device)
    cache = Cache(config, batch, prompt_len + new_tokens - 1, dtype, device)
    steps = new_tokens - 1
    with torch.no_grad():
        synchronize(device)
        t0 = time.perf_counter()
        token = forward(prompts, cache, 0)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(steps):
            token = forward(token, cache, prompt_len + i)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        t2 = time.perf_counter()
    prefill, decode = t1 - t0, t2 - t1
    return {"prefill_ms": 1e3 * prefill, "prefill_tokens_per_s": batch * prompt_len / prefill,
            "ms_per_step": 1e3 * decode / steps,
            "decode_tokens_per_s": batch * steps / decode}


def bench_generate(args, config, weights, device: str) -> dict:
    if args.new_tokens < 2:
        raise SystemExit("bench.py: --new-tokens must be >= 2 (one prefill token, then decode)")
    if args.prompt_len < 1 or args.prompt_len + args.new_tokens - 1 > config.max_seq_len:
        raise SystemExit(f"bench.py: prompt {args.prompt_len} + {args.new_tokens} new tokens do "
                         f"not fit max_seq_len {config.max_seq_len}")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = BenchModel(ReferenceModel(config, weights, device, dtype), trainable=False).eval()
    compiler = Compiler(args.compile)
    compiled = torch.compile(model) if compiler.enabled() else None
    results, runs_all = [], []
    for batch in args.batches:
        runs = {}
        for mode, forward in (("eager", model), ("compiled", compiled)):
            if forward is None or (mode == "compiled" and not compiler.enabled()):
                continue
            log(f"generate batch {batch}, {mode}: warm-up")
            try:
                time_generation(forward, config, batch, args.prompt_len, args.new_tokens, dtype,
                                device)
                runs[mode] = time_generation(forward, config, batch, args.prompt_len,
                                             args.new_tokens, dtype, device)
            except Exception as error:  # noqa: BLE001  (any compile error means eager only)
                if mode == "eager":
                    raise
                compiler.fail(error)
                continue
            log(f"generate batch {batch}, {mode}: {runs[mode]['decode_tokens_per_s']:.0f} "
                f"decode tok/s, {runs[mode]['prefill_tokens_per_s']:.0f} prefill tok/s")
        prefill_mode, decode_mode = faster(runs, "prefill_ms"), faster(runs, "ms_per_step")
        results.append({"batch": batch,
                        "prefill_ms": runs[prefill_mode]["prefill_ms"],
                        "prefill_tokens_per_s": runs[prefill_mode]["prefill_tokens_per_s"],
                        "prefill_mode": prefill_mode,
                        "ms_per_step": runs[decode_mode]["ms_per_step"],
                        "decode_tokens_per_s": runs[decode_mode]["decode_tokens_per_s"],
                        "decode_mode": decode_mode})
        runs_all.append({"batch": batch, **runs})
    return {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "decode_steps": args.new_tokens - 1, "dtype": args.dtype,
            "decode": "greedy (argmax on the device), eos ignored",
            "compile": compiler.describe(), "results": results, "runs": runs_all}


# ---------------------------------------------------------------------------- train


def bench_train(args, config, weights, device: str) -> dict:
    if args.seq_len < 1 or args.seq_len > config.max_seq_len:
        raise SystemExit(f"bench.py: --seq-len {args.seq_len} is outside 1..max_seq_len "
                         f"{config.max_seq_len}")
    model = BenchModel(ReferenceModel(config, weights, device, torch.float32), trainable=True)
    adamw = {"lr": args.lr, "betas": (args.beta1, args.beta2), "eps": args.eps,
             "weight_decay": args.weight_decay}
    optimizer = None
    if device == "cuda":
        try:
            optimizer, fused = torch.optim.AdamW(model.parameters(), fused=True, **adamw), True
        except (TypeError, RuntimeError):
            optimizer = None
    if optimizer is None:
        optimizer, fused = torch.optim.AdamW(model.parameters(), **adamw), False
    generator = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1),
                         generator=generator).to(device)
    tokens, targets = data[:, :-1], data[:, 1:]
    autocast_dtype = {"bfloat16": torch.bfloat16, "float32": None}[args.dtype]

    def step(forward) -> None:
        with (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype
              else contextlib.nullcontext()):
            logits = forward(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size),
                               targets.reshape(-1))
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compiler = Compiler(args.compile)
    runs = {}
    for mode in ("eager", "compiled"):
        if mode == "compiled" and not compiler.enabled():
            continue
        forward = model if mode == "eager" else torch.compile(model)
        log(f"train {args.batch}x{args.seq_len}, {mode}: {args.warmup} warm-up steps")
        try:
            for _ in range(args.warmup):
                step(forward)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(forward)
            synchronize(device)
            elapsed = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001
            if mode == "eager":
                raise
            compiler.fail(error)
            continue
        runs[mode] = {"step_ms": 1e3 * elapsed / args.steps,
                      "tokens_per_s": args.batch * args.seq_len * args.steps / elapsed}
        log(f"train {mode}: {runs[mode]['tokens_per_s']:.0f} tok/s")
    mode = faster(runs, "step_ms")
    return {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup,
            "precision": ("float32 master weights, bfloat16 autocast" if autocast_dtype
                          else "float32"),
            "optimizer": f"AdamW ({'fused' if fused else 'default implementation'}), "
                         f"grad clip {args.grad_clip}",
            "loss": "mean cross-entropy over every position, random tokens",
            "compile": compiler.describe(), "mode": mode, **runs[mode], "runs": runs}


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="an rlhf safetensors checkpoint")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when torch sees a GPU")
    common.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    common.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="auto: try torch.compile, fall back to eager with a note")
    common.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (torch.set_num_threads); 0: torch's default")
    common.add_argument("--out", help="write the JSON here instead of stdout")
    gen = sub.add_parser("generate", parents=[common])
    gen.add_argument("--batches", default="1,16,64,256",
                     help="comma-separated batch sizes")
    gen.add_argument("--prompt-len", type=int, default=128)
    gen.add_argument("--new-tokens", type=int, default=128)
    train = sub.add_parser("train", parents=[common])
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--seq-len", type=int, default=512)
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--seed", type=int, default=11)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--beta1", type=float, default=0.9)
    train.add_argument("--beta2", type=float, default=0.95)
    train.add_argument("--eps", type=float, default=1e-8)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--grad-clip", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "generate":
        args.batches = [int(b) for b in args.batches.split(",") if b]
        if not args.batches or min(args.batches) < 1:
            raise SystemExit("bench.py: --batches needs positive batch sizes")
    elif args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench.py: --batch and --steps must be >= 1, --warmup >= 0")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda, but torch sees no GPU")
    log(f"torch {torch.__version__}, device {device}, loading {args.checkpoint}")
    config, weights = load_checkpoint(args.checkpoint)
    parity = parity_check(config, weights, device)
    log(f"parity with ReferenceModel: max |d logit| {parity['max_abs_logit_diff']:.2e}, "
        f"decode {parity['decode_max_abs_logit_diff']:.2e}")
    summary = {"command": args.command, "torch": torch.__version__,
               "cuda": torch.version.cuda, "device": device,
               "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "threads": torch.get_num_threads(),
               "attention": ("scaled_dot_product_attention" + (" (enable_gqa)" if SDPA_GQA else "")
                             if HAVE_SDPA else "explicit softmax(q k^T) v"),
               "moe": "tokens sorted by expert, per-expert counts to the host once per MoE "
                      "layer, one SwiGLU per expert with tokens (DeepSeek-V3 inference style); "
                      "eager under torch.compile",
               "parity": parity}
    if args.command == "generate":
        summary.update(bench_generate(args, config, weights, device))
    else:
        summary.update(bench_train(args, config, weights, device))
    text = json.dumps(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
