"""Winograd in training (``pyad.ops.conv2d_train``) against torch's direct convolutions,
in one process: forward + backward of each EfficientAD student layer at its training
shape (batch 3: the clean, augmented and penalty image share the trunk; the last layer's
halves at batch 1), and whole S / M training steps (``step_losses`` + Adam) with the
Winograd path and with ``F.conv2d`` in its place. Prints a table and writes
bench/results/winograd_training.json.

    python bench/winograd_training.py [--steps 3]
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyad import ops
from pyad.detectors import efficientad as E

OUT = Path(__file__).parent / "results" / "winograd_training.json"
# (model, batch, in, out, kernel, input side): the students' layers at 256 px
LAYERS = [("s", 3, 128, 256, 4, 126), ("s", 3, 256, 256, 3, 61), ("s", 1, 256, 384, 4, 59),
          ("m", 3, 256, 512, 4, 126), ("m", 3, 512, 512, 3, 61), ("m", 3, 512, 768, 4, 59)]


def best_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def direct(x, w, b, p):
    return F.conv2d(x, w, b, padding=p)


def layer_rows(n: int) -> list[dict]:
    rows = []
    for model, b, c, k, r, h in LAYERS:
        x = torch.randn(b, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, bias = torch.randn(k, c, r, r, requires_grad=True), torch.randn(k, requires_grad=True)

        def step(conv):
            y = conv(x, w, bias, 0)
            y.backward(torch.ones_like(y))

        d, g = best_ms(lambda: step(direct), n), best_ms(lambda: step(ops.conv2d_train), n)
        rows.append({"model": model, "layer": f"{c}->{k} {r}x{r} at {h}², batch {b}", "direct_ms": d,
                     "winograd_ms": g, "speedup": d / g})
        print(f"{model.upper()} {rows[-1]['layer']:32s} direct {d:7.0f} ms  Winograd {g:7.0f} ms  {d / g:.2f}x")
    return rows


def step_ms(model: str, n: int, winograd: bool) -> float:
    torch.manual_seed(0)
    teacher = E.pdn(model).eval().to(memory_format=torch.channels_last)
    student = E.pdn(model, 2 * E.OUT_CHANNELS).train().to(memory_format=torch.channels_last)
    ae = E.autoencoder().train().to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(itertools.chain(student.parameters(), ae.parameters()), 1e-4, weight_decay=1e-5)
    xs = [torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    real = ops.conv2d_train
    if not winograd:  # the same step with torch's convolutions under autograd
        ops.conv2d_train = E.conv2d_train = lambda x, w, b, p: F.conv2d(x, w, b, padding=p)
    try:
        def one():
            with torch.no_grad():
                t_st, t_ae = ops.sequential(teacher, xs[0]), ops.sequential(teacher, xs[1])
            losses = E.step_losses(student, ae, t_st, t_ae, *xs)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
        return best_ms(one, n)
    finally:
        ops.conv2d_train = E.conv2d_train = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M"), "layers": layer_rows(args.steps),
           "steps": {}}
    for model in ("s", "m"):
        d, g = step_ms(model, args.steps, False), step_ms(model, args.steps, True)
        out["steps"][model] = {"direct_ms": d, "winograd_ms": g, "speedup": d / g}
        print(f"{model.upper()} training step (batch 1, penalty image)  direct {d:7.0f} ms  Winograd {g:7.0f} ms  {d / g:.2f}x")
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
