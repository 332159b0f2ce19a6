"""Fit EfficientAD on an MVTec AD category (bottle) and print one JSON line: fit
seconds, image / pixel AUROC, AUPRO, F1-max, F1 at the validation threshold,
per-stage latency (``pyad.latency``: batch 1, 3 warm-up and 5 timed runs per image
on the first ``--latency-images`` test images; throughput at batch 1 and 8), the
teacher / penalty / normalisation records and the loss history.

    nice -n 10 python bench/efficientad_bottle.py --params '{"teacher": "out/efficientad/teacher.pth",
        "image_size": 128, "max_steps": 1000}' --checkpoint out/efficientad/s.ckpt --save out/efficientad/s.pyad

``--teacher-from CKPT --teacher-out PTH`` first writes the PDN of a ``pyad
distill-teacher`` checkpoint (an unfinished distillation) as a teacher file.
``--at-checkpoint-step`` evaluates the model of a copy of a training checkpoint as it
was at that step (max_steps set to the checkpoint's step, so nothing is trained; the
map quantiles from the validation images as at the end of a fit). The learning rate
had not yet decayed there: a point on the way, not a run with that budget.
Used for the figures in docs/detectors/efficientad.md.
"""

import json
import sys

import torch

import pyad
import bottle_cli


def teacher_from_checkpoint(ckpt: str, out: str) -> int:
    """The PDN of a distill-teacher checkpoint -> a teacher state_dict file; returns its step."""
    from pyad import modelfile

    meta, state = modelfile.read_tree(ckpt)
    torch.save({k: v.contiguous() for k, v in state["modules"]["pdn"].items()}, out)
    return int(state["step"])


def main() -> None:
    ap = bottle_cli.parser(__doc__)
    ap.add_argument("--teacher-from", help="a distill-teacher checkpoint to take the teacher from")
    ap.add_argument("--teacher-out", help="where to write that teacher (then used as params['teacher'])")
    ap.add_argument("--at-checkpoint-step", action="store_true",
                    help="evaluate --checkpoint (a copy) at its step instead of training on")
    args = ap.parse_args()
    params = bottle_cli.params(args)
    extra = {}
    if args.teacher_from:
        extra["teacher_distill_step"] = teacher_from_checkpoint(args.teacher_from, args.teacher_out)
        params["teacher"] = args.teacher_out
    if args.at_checkpoint_step:
        from pyad import modelfile

        params["max_steps"] = extra["at_checkpoint_step"] = int(modelfile.read_tree(args.checkpoint)[1]["step"])
    det, ds, fit_s = bottle_cli.fit_or_load(args, lambda: pyad.EfficientAD(**params))
    out = {
        "detector": "EfficientAD", "params": {k: str(v) for k, v in det.get_params().items()},
        **bottle_cli.scores(det, ds, args, fit_s),
        "teacher_source": det.teacher_source_, "penalty_source": det.penalty_source_,
        "map_normalisation": det.map_normalisation_, "quantiles": det.quantiles_, "steps_done": det.steps_done_,
        **extra, "history": det.history_,
    }
    print(json.dumps(out, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
