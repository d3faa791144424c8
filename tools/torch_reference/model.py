"""A PyTorch reference of the rlhf model: the function docs/model.md defines, written plainly.

This is the first rung of the reference ladder (docs/torch_reference.md): an implementation
that shares no code with ours (kernels/cpu/cpu_ops.cpp, the CUDA backend), reads the same
safetensors checkpoint, and must produce the same logits. It is deliberately naive: one
readable line of math per formula in docs/model.md, experts in a Python loop, no fused kernels.

Needs torch (1.13 or newer) and numpy; the checkpoint is read by hand, so the safetensors
package is not needed. Runs on any torch device, in float32 (parity) or bfloat16.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CHECKPOINT_FORMAT = "rlhf-checkpoint-v1"

# ---------------------------------------------------------------------------- checkpoint


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """All tensors of a safetensors file (F32 and U8, the two dtypes we write) and its metadata."""
    dtypes = {"F32": np.dtype("<f4"), "U8": np.dtype("u1")}
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}; expected F32 or U8")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(body[begin:end], dtype=dtypes[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"]).copy()
    return tensors, metadata


@dataclass
class ClampConfig:
    enabled: bool = False
    gate_max: float = 10.0
    linear_limit: float = 10.0


@dataclass
class ModelConfig:
    """The `model:` section, as ModelConfig::to_yaml writes it into a checkpoint."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    n_dense_layers: int
    d_ff: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    d_expert: int
    route_scale: float
    clamp: ClampConfig

    @staticmethod
    def from_yaml(text: str) -> "ModelConfig":
        # to_yaml writes flat `key: value` lines plus one indented `clamp:` block; parsing that
        # exact shape keeps this file free of a YAML dependency.
        top: Dict[str, str] = {}
        clamp: Dict[str, str] = {}
        section = top
        for line in text.splitlines():
            if not line.strip():
                continue
            key, _, value = line.strip().partition(":")
            value = value.strip()
            if line.startswith("  "):
                section[key] = value
            elif value == "":
                section = clamp if key == "clamp" else {}
            else:
                section = top
                top[key] = value
        ints = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "max_seq_len", "n_dense_layers", "d_ff", "n_routed_experts",
                "n_shared_experts", "top_k", "d_expert"]
        floats = ["rope_theta", "norm_eps", "route_scale"]
        fields = {k: int(top[k]) for k in ints}
        fields.update({k: float(top[k]) for k in floats})
        return ModelConfig(
            **fields,
            clamp=ClampConfig(enabled=clamp.get("enabled", "false") == "true",
                              gate_max=float(clamp.get("gate_max", "10")),
                              linear_limit=float(clamp.get("linear_limit", "10"))))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers


# ---------------------------------------------------------------------------- FP4 experts
# Decoding only, with the rules of kernels/fp4/fp4.h: value = E2M1(code) * block multiplier,
# one IEEE float32 multiply; the multiplier is 2^(e - 127) (MXFP4, E8M0) or E4M3(scale) *
# global_scale (NVFP4, one float32 multiply). numpy float32 arithmetic rounds the same way.


def _e2m1_table() -> np.ndarray:
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    return np.array(magnitudes + [-m for m in magnitudes], dtype=np.float32)  # bit 3 = sign


def _e8m0_table() -> np.ndarray:
    bits = np.arange(256, dtype=np.uint32) << 23
    bits[0] = 0x00400000  # e == 0 is 2^-127, a float subnormal
    bits[255] = 0x7FC00000  # NaN
    return bits.view(np.float32)


def _e4m3_table() -> np.ndarray:
    code = np.arange(256, dtype=np.uint32)
    sign = (code & 0x80) << 24
    e = (code >> 3) & 15
    m = code & 7
    normal = sign | ((e + 120) << 23) | (m << 20)
    subnormal = sign | (m.astype(np.float32) * np.float32(2.0 ** -9)).view(np.uint32)
    bits = np.where(e != 0, normal, subnormal).astype(np.uint32)
    bits[(code & 0x7F) == 0x7F] |= 0x7FC00000  # NaN
    return bits.view(np.float32)


def fp4_dequantize(fmt: str, codes: np.ndarray, scales: np.ndarray,
                   global_scale: float) -> np.ndarray:
    """[rows, cols] float32 from codes [rows, cols/2] (element 2i in the low nibble) and scales."""
    rows = codes.shape[0]
    values = np.empty((rows, codes.shape[1] * 2), dtype=np.float32)
    table = _e2m1_table()
    values[:, 0::2] = table[codes & 0x0F]
    values[:, 1::2] = table[codes >> 4]
    if fmt == "mxfp4":
        multiplier = _e8m0_table()[scales]
    elif fmt == "nvfp4":
        multiplier = _e4m3_table()[scales] * np.float32(global_scale)
    else:
        raise ValueError(f"unknown expert_format '{fmt}' (known: mxfp4, nvfp4)")
    block = values.shape[1] // scales.shape[1]
    return (values.reshape(rows, -1, block) * multiplier[:, :, None]).reshape(rows, -1)


def load_checkpoint(path: str) -> Tuple[ModelConfig, Dict[str, np.ndarray]]:
    """The config and every `model.*` weight, with packed FP4 experts decoded to float32, and
    the router balancing biases (`buffer.*`), keyed by their names without the prefix."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an rlhf checkpoint (format '{metadata.get('format')}')")
    if metadata.get("tokenizer") != "byte":
        raise ValueError(f"{path}: tokenizer '{metadata.get('tokenizer')}' is not supported")
    config = ModelConfig.from_yaml(metadata["model_config"])
    weights = {n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")}
    weights.update({n[len("buffer."):]: t for n, t in tensors.items() if n.startswith("buffer.")})
    fmt = metadata.get("expert_format")
    for name in [n for n in tensors if n.startswith("fp4.") and n.endswith(".codes")]:
        base = name[len("fp4."):-len(".codes")]
        matrix = fp4_dequantize(fmt, tensors[name], tensors[f"fp4.{base}.scales"],
                                float(tensors[f"fp4.{base}.global_scale"][0]))
        weights[base] = matrix  # reshaped to the layer's layout in ReferenceModel
    return config, weights


# ---------------------------------------------------------------------------- the model


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32 whatever the compute dtype: a bf16 mean of squares loses too much.
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotates adjacent pairs (2i, 2i+1) of each head by pos * theta^(-2i/hd).
    x: [B, T, H, hd]; positions: [B, T]. Angles in float64, as the CPU reference's table."""
    hd = x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64, device=x.device) / hd)
    angle = positions.to(torch.float64)[:, :, None, None] * inv_freq  # [B, T, 1, hd/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
           clamp: ClampConfig) -> torch.Tensor:
    gate, up = x @ w_gate.T, x @ w_up.T
    if clamp.enabled:
        # The gate is clamped from above only; the linear branch on both sides.
        gate = gate.clamp(max=clamp.gate_max)
        up = up.clamp(-clamp.linear_limit, clamp.linear_limit)
    return (F.silu(gate) * up) @ w_down.T


class KVCache:
    """Keys and values of every processed position, per layer: [B, capacity, Hkv, hd]."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype, device):
        shape = (batch, capacity, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0  # positions filled, the same for every sequence of the batch


class ReferenceModel:
    def __init__(self, config: ModelConfig, weights: Dict[str, np.ndarray],
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.config, self.device, self.dtype = config, device, dtype
        c = config
        expected = {"embed": (c.vocab_size, c.d_model), "final_norm": (c.d_model,),
                    "lm_head": (c.vocab_size, c.d_model)}
        E, Fe, D = c.n_routed_experts, c.d_expert, c.d_model
        for i in range(c.n_layers):
            p = f"layers.{i}."
            expected.update({p + "attn_norm": (D,), p + "wq": (c.n_heads * c.head_dim, D),
                             p + "wk": (c.n_kv_heads * c.head_dim, D),
                             p + "wv": (c.n_kv_heads * c.head_dim, D),
                             p + "wo": (D, c.n_heads * c.head_dim), p + "ffn_norm": (D,)})
            if not c.is_moe_layer(i):
                expected.update({p + "ffn.w_gate": (c.d_ff, D), p + "ffn.w_up": (c.d_ff, D),
                                 p + "ffn.w_down": (D, c.d_ff)})
                continue
            expected.update({p + "router": (E, D), p + "router_bias": (E,),
                             p + "experts.w_gate": (E, Fe, D), p + "experts.w_up": (E, Fe, D),
                             p + "experts.w_down": (E, D, Fe)})
            if c.n_shared_experts > 0:
                S = c.n_shared_experts * Fe
                expected.update({p + "shared.w_gate": (S, D), p + "shared.w_up": (S, D),
                                 p + "shared.w_down": (D, S)})
        missing = sorted(set(expected) - set(weights))
        unknown = sorted(set(weights) - set(expected))
        if missing or unknown:
            raise ValueError(f"checkpoint does not match its config: missing {missing}, "
                             f"unknown {unknown}")
        self.w: Dict[str, torch.Tensor] = {}
        for name, shape in expected.items():
            # FP4 matrices come decoded as [rows, cols]; the reshape restores [E, out, in].
            array = weights[name].reshape(shape)
            # The router and its bias stay float32 in every mode: they only pick experts and
            # weigh them, and a bf16 router would flip choices that float32 makes.
            keep32 = name.endswith("router") or name.endswith("router_bias")
            self.w[name] = torch.from_numpy(array).to(
                device=device, dtype=torch.float32 if keep32 else dtype)

    @staticmethod
    def from_checkpoint(path: str, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        config, weights = load_checkpoint(path)
        return ReferenceModel(config, weights, device, dtype)

    # ------------------------------------------------------------------ blocks

    def attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor,
                  cache: Optional[KVCache]) -> torch.Tensor:
        c, p = self.config, f"layers.{layer}."
        B, T, _ = x.shape
        q = (x @ self.w[p + "wq"].T).view(B, T, c.n_heads, c.head_dim)
        k = (x @ self.w[p + "wk"].T).view(B, T, c.n_kv_heads, c.head_dim)
        v = (x @ self.w[p + "wv"].T).view(B, T, c.n_kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer][:, start:start + T] = k
            cache.v[layer][:, start:start + T] = v
            k, v = cache.k[layer][:, :start + T], cache.v[layer][:, :start + T]
        # Grouped-query attention: query head h reads key/value head h // (Hq / Hkv).
        group = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(c.head_dim)
        # Query t sits at absolute position start + t and reads keys 0 .. start + t.
        key_pos = torch.arange(k.shape[1], device=x.device)
        query_pos = start + torch.arange(T, device=x.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        probs = scores.softmax(-1).to(x.dtype)
        out = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, c.n_heads * c.head_dim)
        return out @ self.w[p + "wo"].T

    def moe(self, layer: int, f: torch.Tensor,
            replay: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """FFN(f) = Shared(f) + sum_j g_j Expert_{e_j}(f) for f [N, D]; also the chosen [N, k]."""
        c, p = self.config, f"layers.{layer}."
        scores = torch.sigmoid(f.float() @ self.w[p + "router"].T)  # [N, E]
        if replay is None:
            # Top-k of score + bias, ties to the lower expert id: a stable descending sort
            # keeps equal values in id order. The bias steers this choice and nothing else.
            biased = scores + self.w[p + "router_bias"]
            chosen = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, :c.top_k]
        else:
            chosen = replay
        chosen_scores = scores.gather(1, chosen)
        gates = c.route_scale * chosen_scores / chosen_scores.sum(-1, keepdim=True)  # [N, k]
        out = torch.zeros_like(f)
        if c.n_shared_experts > 0:
            # S shared experts are one SwiGLU of width S * Fe: the same function as S of them.
            out = out + swiglu(f, self.w[p + "shared.w_gate"], self.w[p + "shared.w_up"],
                               self.w[p + "shared.w_down"], c.clamp)
        for e in range(c.n_routed_experts):
            token, choice = torch.nonzero(chosen == e, as_tuple=True)
            if token.numel() == 0:
                continue
            y = swiglu(f[token], self.w[p + "experts.w_gate"][e], self.w[p + "experts.w_up"][e],
                       self.w[p + "experts.w_down"][e], c.clamp)
            out = out.index_add(0, token, y * gates[token, choice, None].to(f.dtype))
        return out, chosen

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                replay: Optional[List[torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """logits [B, T, V] (float32) for tokens [B, T], and the experts chosen per MoE layer
        ([B*T, k] each). With a cache, the tokens continue the cached positions. With replay
        (one [B*T, k] per MoE layer), those experts are used instead of the router's top-k."""
        c = self.config
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > c.max_seq_len:
            raise ValueError(f"{start + T} positions exceed max_seq_len {c.max_seq_len}")
        positions = (start + torch.arange(T, device=self.device)).expand(B, T)
        x = self.w["embed"][tokens]
        routing = []
        for i in range(c.n_layers):
            p = f"layers.{i}."
            x = x + self.attention(i, rmsnorm(x, self.w[p + "attn_norm"], c.norm_eps),
                                   positions, cache)
            f = rmsnorm(x, self.w[p + "ffn_norm"], c.norm_eps)
            if not c.is_moe_layer(i):
                x = x + swiglu(f, self.w[p + "ffn.w_gate"], self.w[p + "ffn.w_up"],
                               self.w[p + "ffn.w_down"], c.clamp)
                continue
            m = i - c.n_dense_layers
            y, chosen = self.moe(i, f.reshape(B * T, -1), replay[m] if replay else None)
            x = x + y.view(B, T, -1)
            routing.append(chosen)
        if cache is not None:
            cache.length += T
        logits = rmsnorm(x, self.w["final_norm"], c.norm_eps) @ self.w["lm_head"].T
        return logits.float(), routing
