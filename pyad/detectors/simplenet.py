"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection
and Localization", CVPR 2023), faithful to the official code (DonaldRR/SimpleNet
at 351a2b8: ``simplenet.py``, ``common.py``, ``run.sh``, ``main.py``).

Defaults as the official ``run.sh``: frozen Wide-ResNet-50-2, layers 2+3, 3×3
neighbourhoods (stride 1) adaptively averaged to 1536 per layer (MeanMapper),
layer 3 bilinearly resized onto layer 2's grid, the two averaged to 1536
(Aggregator): pyad's PatchCore embedding (``PatchCoreEmbed``). Resize 329 and
centre crop 288 give 36×36 patches of 1536 values per image.

- Feature adaptor G: one ``Linear(1536, 1536)`` (``Projection``, ``pre_proj=1``,
  ``simplenet.py:59-87``), xavier-normal weights.
- Anomalous features: q⁻ = q + ε, ε ~ N(0, σ²I) on every patch, σ = 0.015
  (``mix_noise=1``: one noise level; ``simplenet.py:487-493``).
- Discriminator D: ``Linear(1536, 1024) → BatchNorm1d → LeakyReLU(0.2) →
  Linear(1024, 1, bias=False)`` (``simplenet.py:35-56``), xavier-normal weights;
  one forward over the concatenated [q; q⁻] rows, so BatchNorm's batch statistics
  cover both (``simplenet.py:495``).
- Loss, truncated L1 (paper eq. 5, ``simplenet.py:499-508``):
  mean(max(0, th − D(q))) + mean(max(0, D(q⁻) + th)), th = 0.5.
- AdamW (lr 1e-4 = ``lr·0.1``, weight decay 0.01: torch's default) for G, Adam
  (2e-4, weight decay 1e-5) for D, both stepped after every batch of 8 images
  (``simplenet.py:185,196,512-517``); no learning-rate schedule (``cos_lr`` off);
  40 meta-epochs × 4 ``gan_epochs`` = 160 passes (``run.sh``).
- Patch score −D(G(p)); image score = max over the raw patch scores; map =
  bilinear upsampling + Gaussian blur σ = 4 (``simplenet.py:594-612``,
  ``common.py:76-121``).

What pyad does differently, and why:

- The backbone is frozen and runs in eval mode without gradients, so its patch
  features do not change during training: pyad extracts them **once per fit**
  and the 160 passes run the adaptor and discriminator on the cached features
  (the official loop recomputes the backbone for every batch of every pass; the
  same numbers, bench/test_bench_simplenet.py measures the difference).
- **No test-set model selection.** The official ``train()`` evaluates the test set
  after every meta-epoch and keeps the best of the 40 (``simplenet.py:419-452``;
  its users show the reported numbers depend on it, SimpleNet issues #7, #77).
  pyad keeps the last epoch (``select="last"``, default), or with
  ``select="synthetic"`` the best of the same 40 evaluations on the normal
  validation images plus synthetic-anomaly copies of them
  (``pyad.datasets.add_anomaly``: Perlin blobs and cut-paste patches), image AUROC
  with ties broken by pixel AUROC, as the official code breaks them.
- Inference folds the adaptor, the first discriminator Linear and its BatchNorm
  (running statistics) into one Linear: G and the first Linear are affine maps with
  nothing in between, so this is the same function (tested) at about 40% of the
  multiply-adds.

The lightweight settings (Baßler, KIT thesis 2024, §3.5, §5): ``backbone``
("resnet18", "resnet34", "mobilenet_v2", ...), ``layers``, ``image_size`` /
``crop_size`` (e.g. 256 / None) and ``embed_dim`` / ``target_dim`` are parameters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from ..ops import gaussian_blur, upsample
from .base import Validation, register, stage
from .frozen import FrozenFeatureDetector
from .patchcore import PatchCoreEmbed
from .settings import BackboneSettings, Preprocessing, Runtime, Thresholds, Training, check
from .trained import TrainedDetector

_SELECT = ("last", "synthetic")


# -- the networks (official simplenet.py:27-87) -----------------------------------------------------
def _xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)


class Adaptor(nn.Module):
    """``Projection(d, d, n_layers, layer_type=0)``: ``n_layers`` Linears, no activation
    (0 layers: the identity, the ``pre_proj=0`` ablation)."""

    def __init__(self, dim: int, n_layers: int = 1):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(n_layers)])
        self.apply(_xavier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(nn.Module):
    """``n_layers − 1`` blocks Linear → BatchNorm1d → LeakyReLU(0.2), then
    ``Linear(hidden, 1, bias=False)``: [N, d] -> [N, 1]."""

    def __init__(self, dim: int, n_layers: int = 2, hidden: int = 1024):
        super().__init__()
        blocks, c = [], dim
        for _ in range(n_layers - 1):
            blocks.append(nn.Sequential(nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)))
            c = hidden
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Linear(c, 1, bias=False)
        self.apply(_xavier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x))


def truncated_l1(true_scores: torch.Tensor, fake_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(max(0, th − D(q))) + mean(max(0, D(q⁻) + th)) (paper eq. 5 with th⁺ = th,
    th⁻ = −th; ``simplenet.py:502-508``)."""
    return (margin - true_scores).clamp_min(0).mean() + (fake_scores + margin).clamp_min(0).mean()


def training_loss(adaptor: nn.Module, dsc: nn.Module, feats: torch.Tensor, noise_std: float, margin: float):
    """One step's loss on patch features [N, d]: q = G(p), q⁻ = q + N(0, σ²) (torch's
    global generator), D over [q; q⁻] in one batch. Returns (loss, p_true, p_fake):
    the shares of patches beyond the margins, as the official progress shows."""
    q = adaptor(feats)
    fake = q + torch.normal(0.0, noise_std, q.shape, device=q.device, dtype=q.dtype)
    scores = dsc(torch.cat([q, fake]))
    true_s, fake_s = scores[: len(q)], scores[len(q) :]
    loss = truncated_l1(true_s, fake_s, margin)
    with torch.no_grad():
        p_true = (true_s >= margin).float().mean()
        p_fake = (fake_s < -margin).float().mean()
    return loss, p_true, p_fake


# -- inference ---------------------------------------------------------------------------------------
@torch.no_grad()
def fold(adaptor: Adaptor, dsc: Discriminator) -> nn.Sequential:
    """The eval-mode scoring MLP p -> D(G(p)) with G, the first Linear and its
    BatchNorm1d folded into one Linear (computed in float64), then the remaining
    LeakyReLU / blocks / tail. Equal to ``dsc.eval()(adaptor(p))`` up to rounding."""
    linears = list(adaptor.layers)
    rest: list[nn.Module] = []
    blocks = list(dsc.body)
    if blocks:
        first_lin, first_bn, act = blocks[0]
        linears.append(first_lin)
        rest.append(act)
        for lin, bn, a in blocks[1:]:
            rest += [_affine([lin], bn), a]
        rest.append(dsc.tail)
        head = _affine(linears, first_bn)
    else:
        linears.append(dsc.tail)
        head = _affine(linears, None)
    return nn.Sequential(head, *[_copy(m) for m in rest])


def _affine(linears: list[nn.Linear], bn: nn.BatchNorm1d | None) -> nn.Linear:
    w = torch.eye(linears[0].in_features, dtype=torch.float64)
    b = torch.zeros(linears[0].in_features, dtype=torch.float64)
    for lin in linears:
        lw = lin.weight.double()
        w, b = lw @ w, lw @ b + (lin.bias.double() if lin.bias is not None else 0.0)
    if bn is not None:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w, b = w * scale[:, None], (b - bn.running_mean.double()) * scale + bn.bias.double()
    out = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0])  # no init: leaves torch's RNG alone
    out.weight.copy_(w.float())
    out.bias.copy_(b.float())
    return out


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


class SimpleNetHead(nn.Module):
    """Patch features [B, H, W, d] -> (scores [B], maps [B, S, S]): patch score
    −D(G(p)), image score = the maximum patch score, map = bilinear upsampling +
    Gaussian blur."""

    def __init__(self, mlp: nn.Module, size: int, blur_sigma: float):
        super().__init__()
        self.mlp, self.size, self.blur_sigma = mlp, size, blur_sigma

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, d = emb.shape
        patch = -self.mlp(emb.reshape(b * h * w, d)).reshape(b, h, w)
        scores = patch.reshape(b, h * w).max(1).values
        stage("search")  # adaptor + discriminator (the latency protocol's third stage)
        maps = gaussian_blur(upsample(patch, self.size), self.blur_sigma)
        stage("map")
        return scores, maps


class SimpleNetModule(nn.Module):
    def __init__(self, embed: PatchCoreEmbed, head: SimpleNetHead):
        super().__init__()
        self.embed, self.head = embed, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.embed(x))


# -- the detector -------------------------------------------------------------------------------------
@register("simplenet")
class SimpleNet(TrainedDetector, FrozenFeatureDetector):
    """SimpleNet. ``networks_["adaptor"]``, ``networks_["discriminator"]`` after fit.

    embed_dim: per-layer length of the neighbourhood features (official
        ``pretrain_embed_dimension`` 1536); target_dim: after aggregating the layers
        (``target_embed_dimension`` 1536; also the adaptor's and D's width).
    patch_size: the neighbourhood (3).
    adaptor_layers: Linears of the feature adaptor (``pre_proj``: 1; 0 = none).
    dsc_layers, dsc_hidden: discriminator depth (2) and width (1024).
    noise_std: σ of the Gaussian noise on the adapted features (0.015).
    margin: th of the truncated L1 loss (0.5).
    lr: the adaptor's AdamW learning rate (1e-4); adaptor_weight_decay: 0.01.
    dsc_lr, dsc_weight_decay: the discriminator's Adam (2e-4, 1e-5).
    max_epochs: passes over the training features (160 = 40 × 4).
    select: "last" (the last pass's networks; default) or "synthetic" (the best of
        the evaluations every ``select_every`` passes on the validation images and
        synthetic-anomaly copies of them; ``early_stopping_patience`` counts these).
    blur_sigma: Gaussian blur of the map (4).
    """

    groups = (BackboneSettings, Preprocessing, Runtime, Thresholds, Training)
    defaults = dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"), image_size=329, crop_size=288,
                    batch_size=8, max_epochs=160, lr=1e-4)
    # the evaluations on synthetic anomalies do not change the training trajectory (tested),
    # so a select="synthetic" run's checkpoint also gives its last pass (select="last")
    resume_across = frozenset({"select", "select_every"})

    def __init__(self, *, embed_dim=1536, target_dim=1536, patch_size=3, adaptor_layers=1, dsc_layers=2,
                 dsc_hidden=1024, noise_std=0.015, margin=0.5, dsc_lr=2e-4, adaptor_weight_decay=0.01,
                 dsc_weight_decay=1e-5, select="last", select_every=4, blur_sigma=4.0, **common):
        super().__init__(**common)
        self.embed_dim = embed_dim
        self.target_dim = target_dim
        self.patch_size = patch_size
        self.adaptor_layers = adaptor_layers
        self.dsc_layers = dsc_layers
        self.dsc_hidden = dsc_hidden
        self.noise_std = noise_std
        self.margin = margin
        self.dsc_lr = dsc_lr
        self.adaptor_weight_decay = adaptor_weight_decay
        self.dsc_weight_decay = dsc_weight_decay
        self.select = select
        self.select_every = select_every
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        def pos_int(v, lo=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        check(pos_int(self.embed_dim), "embed_dim", "a positive int", self.embed_dim)
        check(pos_int(self.target_dim), "target_dim", "a positive int", self.target_dim)
        check(pos_int(self.patch_size) and self.patch_size % 2 == 1, "patch_size", "an odd positive int",
              self.patch_size)
        check(pos_int(self.adaptor_layers, 0), "adaptor_layers", "an int >= 0", self.adaptor_layers)
        check(pos_int(self.dsc_layers), "dsc_layers", "an int >= 1", self.dsc_layers)
        check(pos_int(self.dsc_hidden), "dsc_hidden", "a positive int", self.dsc_hidden)
        check(lambda: self.noise_std > 0, "noise_std", "a positive number", self.noise_std)
        check(lambda: self.margin >= 0, "margin", "a number >= 0", self.margin)
        check(lambda: self.dsc_lr > 0, "dsc_lr", "a positive number", self.dsc_lr)
        check(lambda: self.adaptor_weight_decay >= 0, "adaptor_weight_decay", "a number >= 0",
              self.adaptor_weight_decay)
        check(lambda: self.dsc_weight_decay >= 0, "dsc_weight_decay", "a number >= 0", self.dsc_weight_decay)
        check(self.select in _SELECT, "select", f"one of {_SELECT}", self.select)
        check(pos_int(self.select_every), "select_every", "a positive int", self.select_every)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)
        check(self.early_stopping_patience is None or self.select == "synthetic", "early_stopping_patience",
              "None unless select='synthetic' (the only validation quantity SimpleNet has)",
              self.early_stopping_patience)

    # -- networks and the inference module ------------------------------------------------------------
    def _networks(self):
        return {"adaptor": Adaptor(self.target_dim, self.adaptor_layers),
                "discriminator": Discriminator(self.target_dim, self.dsc_layers, self.dsc_hidden)}

    def _embedder(self, net):
        k = self.patch_size
        return PatchCoreEmbed(net, self.layers, "unfold", k, 1, (k - 1) // 2, self.embed_dim, self.target_dim)

    def _head(self, nets) -> SimpleNetHead:
        return SimpleNetHead(fold(nets["adaptor"].eval(), nets["discriminator"].eval()), self.preprocessing.size,
                             self.blur_sigma)

    def _build_module(self):
        return SimpleNetModule(self._embedder(self._network()), self._head(self.networks_))

    # -- training -------------------------------------------------------------------------------------
    def _features(self, embed: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Patch features of uint8 images [N, S, S, 3], once: [N, H, W, d] float32."""
        out = None
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                emb = embed(self.to_input(images[start : start + self.batch_size]))
                if out is None:
                    out = torch.empty((len(images), *emb.shape[1:]), dtype=torch.float32, device=emb.device)
                out[start : start + len(emb)] = emb
        return out

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        embed = self._embedder(self._network())
        feats = self._features(embed, train)
        n, h, w, d = feats.shape
        rows = feats.reshape(n, h * w, d)
        val_feats = self._features(embed, val) if len(val) else None
        synth = self._synthetic(embed, val, val_feats) if self.select == "synthetic" else None

        adaptor, dsc = nets["adaptor"], nets["discriminator"]
        opts = {"discriminator": training.optimizer("adam", dsc.parameters(), self.dsc_lr,
                                                    weight_decay=self.dsc_weight_decay)}
        if self.adaptor_layers:
            opts["adaptor"] = training.optimizer("adamw", adaptor.parameters(), self.lr,
                                                 weight_decay=self.adaptor_weight_decay)
        patience = None
        if synth is not None:  # keep the best evaluation (Run restores it); stop early only if asked
            patience = self.early_stopping_patience or (self.max_epochs or 0) + 1
        run = training.Run(self.name, modules=nets, optimizers=opts, max_epochs=self.max_epochs,
                           max_steps=self.max_steps, checkpoint=checkpoint, device=self.device, amp=self.amp,
                           early_stopping_patience=patience, settings=self.run_settings())
        if synth is not None and run.resumed:
            done = {r["epoch"] for r in run.history if "image_auroc" in r}
            if any(e not in done for e in range(self.select_every, run.epoch + 1, self.select_every)):
                raise ValueError(f"checkpoint: {checkpoint} was trained without select='synthetic' evaluations "
                                 "(its best pass is unknown); use select='last' with it, or another checkpoint path")
        batches = training.Batches(n, self.batch_size, self.seed)
        for epoch in run.epochs():
            adaptor.train()
            dsc.train()
            for idx in run.each(batches.epoch(epoch)):
                x = rows[torch.from_numpy(idx)].reshape(-1, d)
                with run.autocast():
                    loss, p_true, p_fake = training_loss(adaptor, dsc, x, self.noise_std, self.margin)
                run.backward(loss)
                run.log(loss=loss, p_true=p_true, p_fake=p_fake)
            if synth is not None and ((epoch + 1) % self.select_every == 0 or epoch + 1 == self.max_epochs):
                image_auroc, pixel_auroc = self._evaluate_synthetic(nets, synth)
                # lexicographic (image AUROC, then pixel AUROC) as one lower-is-better value:
                # an image-AUROC step (>= 1/(n_pos·n_neg)) outweighs any pixel difference
                step = 0.5 / (len(synth["labels"]) // 2) ** 2
                stop = run.validate((1.0 - image_auroc) + step * (1.0 - pixel_auroc))
                run.history[-1].update(image_auroc=image_auroc, pixel_auroc=pixel_auroc)  # kept in checkpoints
                if stop:
                    break
        run.finish()
        self.history_ = run.history
        self.selection_ = [{k: r[k] for k in ("epoch", "image_auroc", "pixel_auroc")}
                           for r in run.history if "image_auroc" in r]
        self.selected_epoch_ = run.best_epoch if synth is not None and run.best_epoch is not None else run.epoch
        if val_feats is None:
            return None
        with torch.inference_mode():
            scores, maps = self._head(nets)(val_feats)
        return Validation(scores.float().cpu().numpy(), maps.float().cpu().numpy())

    def _synthetic(self, embed, val: torch.Tensor, val_feats) -> dict:
        """The selection set: the normal validation images and one synthetic-anomaly
        copy of each (Perlin blob or cut-paste patch, alternating), features and masks."""
        from ..datasets import add_anomaly

        if val_feats is None:
            raise ValueError("select: 'synthetic' needs validation images (validation > 0 or validation=<images>)")
        rng = np.random.default_rng([self.seed, 1])
        bad, masks = [], []
        for i, img in enumerate(val.numpy()):
            new, mask = add_anomaly(img, rng, "perlin" if i % 2 == 0 else "cutpaste")
            bad.append(new)
            masks.append(mask)
        bad_feats = self._features(embed, torch.from_numpy(np.stack(bad)))
        s = self.preprocessing.size
        masks = [np.zeros((s, s), bool)] * len(val) + masks
        return {"feats": torch.cat([val_feats, bad_feats]), "masks": masks,
                "labels": np.r_[np.zeros(len(val), int), np.ones(len(val), int)]}

    def _evaluate_synthetic(self, nets, synth) -> tuple[float, float]:
        from .. import metrics as M

        was = {k: m.training for k, m in nets.items()}
        with torch.inference_mode():
            scores, maps = self._head(nets)(synth["feats"])
        for k, m in nets.items():
            m.train(was[k])
        maps = maps.float().cpu().numpy()
        return (M.image_auroc(synth["labels"], scores.float().cpu().numpy()),
                M.pixel_auroc(synth["masks"], list(maps)))

    def _buffers(self):
        return {"history": getattr(self, "history_", []), "selection": getattr(self, "selection_", []),
                "selected_epoch": getattr(self, "selected_epoch_", None)}

    def _load_buffers(self, state):
        self.history_ = state.get("history", [])
        self.selection_ = state.get("selection", [])
        self.selected_epoch_ = state.get("selected_epoch")
