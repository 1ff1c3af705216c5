"""A nanoGPT-style GPT-2 train step in PyTorch: the peer `experiments.bench --peer=torch` times.

    python benchmarks/peers/gpt2_torch.py --shape=nanogpt --mode=compile --steps=5 --warmup=2

Stands alone (torch only, no gopher import) so it runs under any interpreter with torch
(`pip install -e '.[bench]'`). The model is nanoGPT's: pre-norm blocks, LayerNorm without
bias, fused causal attention (F.scaled_dot_product_attention), a 4x GELU MLP, learned
absolute positions, the input embedding tied to the output projection, no biases, the
loss inside forward. Fused AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1 on 2-D
parameters only), global-norm clip 1.0, fp32, one fixed batch of random tokens (as the
gopher side times it). --mode=compile wraps the model in torch.compile, as nanoGPT does;
Inductor caches its code under /tmp, so later compiles of a shape take seconds.

Shapes: B batch, T sequence, D d_model, H heads, Q = D / H key size, V vocab, L layers.

Timing: the first warmup step is timed on its own (`first_step_s`: in compile mode it
includes torch.compile's tracing and code generation), the rest of --warmup untimed, then
--steps steps one by one; `tokens_per_sec` is B * T over the median step. Prints one JSON
line; `peak_rss_gib` is this process's ru_maxrss. On a busy machine prefer --threads=1:
OpenMP threads that wait on a descheduled sibling can make a step many times slower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {
    # name: (layers, heads, d_model, vocab, seq, batch): gopher's 44m row at seq 512, batch 8.
    "nanogpt": (8, 16, 512, 32000, 512, 8),
}
DIMS = ("layers", "heads", "d_model", "vocab", "seq", "batch")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):  # [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # [B, H, T, Q]: the layout scaled_dot_product_attention takes.
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model, bias=False)
        self.attn = CausalSelfAttention(d_model, heads)
        self.norm_mlp = nn.LayerNorm(d_model, bias=False)
        self.up = nn.Linear(d_model, 4 * d_model, bias=False)
        self.down = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x):  # [B, T, D]
        x = x + self.attn(self.norm_attn(x))
        return x + self.down(F.gelu(self.up(self.norm_mlp(x))))


class GPT2(nn.Module):
    def __init__(self, layers: int, heads: int, d_model: int, vocab: int, seq: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab, d_model)
        self.position_embed = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm_final = nn.LayerNorm(d_model, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's init: N(0, 0.02), the projections that add into the residual
                # stream scaled by 1 / sqrt(2 L) so its variance does not grow with depth.
                residual = name.endswith(("attn.proj.weight", "down.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, tokens, targets):  # [B, T], [B, T] -> mean cross-entropy
        t = tokens.shape[1]
        x = self.token_embed(tokens) + self.position_embed(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        # Tied embeddings: the output projection is the token embedding's transpose.
        logits = F.linear(self.norm_final(x), self.token_embed.weight)  # [B, T, V]
        # The loss inside forward, as nanoGPT has it: torch.compile fuses it with the
        # projection, and no [B, T, V] logits outlive the call into the backward pass.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def matmul_params(model: GPT2) -> int:
    """Parameters that take part in a matmul: every Linear weight plus the tied embedding
    (the output projection); positions and norm scales are excluded (gopher's convention)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear + model.token_embed.weight.numel()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (CPU too since torch 2.4), no per-step
    # temporaries of the parameters' size. nanoGPT asks for it on CUDA only; on a CPU it can
    # only speed the peer up, which this comparison leaves it.
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="nanogpt", help=f"one of {', '.join(SHAPES)}")
    for dim in DIMS:
        p.add_argument(f"--{dim}", type=int, default=None, help=f"{dim} (default: the shape's)")
    p.add_argument("--mode", default="eager", help="eager | compile (torch.compile the model)")
    p.add_argument("--compile", action="store_true", help="same as --mode=compile")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads (0: every CPU this process may use)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.shape not in SHAPES:
        p.error(f"--shape={args.shape} is unknown; choose one of {', '.join(SHAPES)}")
    for dim, default in zip(DIMS, SHAPES[args.shape], strict=True):
        if getattr(args, dim) is None:
            setattr(args, dim, default)
        if getattr(args, dim) < 1:
            p.error(f"--{dim}={getattr(args, dim)} must be at least 1")
    if args.d_model % args.heads:
        p.error(f"--d_model={args.d_model} is not a multiple of --heads={args.heads}")
    if args.compile:
        args.mode = "compile"
    if args.mode not in ("eager", "compile"):
        p.error(f"--mode={args.mode} is unknown; use --mode=eager or --mode=compile")
    if args.steps < 1 or args.warmup < 1:
        p.error(f"--steps={args.steps} and --warmup={args.warmup} must both be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The CPUs this process may run on (taskset, cpusets), not the host's count.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cpus)
    torch.manual_seed(args.seed)
    model = GPT2(args.layers, args.heads, args.d_model, args.vocab, args.seq)
    optimizer = make_optimizer(model)
    # nanoGPT's choice: compile the model (its forward includes the loss), not the optimizer.
    forward = torch.compile(model) if args.mode == "compile" else model
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))  # [B, T + 1]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def train_step() -> float:
        loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    start = time.perf_counter()
    loss_first = train_step()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        train_step()
    times = []
    cpu_start = time.process_time()
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = train_step()
        times.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_start) / args.steps
    step_s = statistics.median(times)

    n_matmul = matmul_params(model)
    h, q = args.heads, args.d_model // args.heads
    result = {
        "peer": "torch",
        "mode": args.mode,
        **{dim: getattr(args, dim) for dim in DIMS},
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_sec": round(args.batch * args.seq / step_s, 1),
        "step_time_s": round(step_s, 6),
        "step_time_min_s": round(min(times), 4),
        "step_cpu_s": round(cpu_per_step, 3),
        "first_step_s": round(first_step_s, 2),
        # What the first step cost beyond a steady one: torch.compile's work in compile mode.
        "compile_s": round(first_step_s - step_s, 2) if args.mode == "compile" else None,
        "loss_first": round(loss_first, 4),
        "loss": round(loss, 4),
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params": n_matmul,
        "flops_per_token": 6 * n_matmul + 12 * args.layers * h * q * args.seq,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "threads": torch.get_num_threads(),
        "optimizer": "AdamW(fused)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
