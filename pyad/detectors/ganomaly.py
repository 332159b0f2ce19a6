"""GANomaly (Akcay, Atapour-Abarghouei and Breckon, "GANomaly: Semi-Supervised
Anomaly Detection via Adversarial Training", ACCV 2018), faithful to the reference
code (samet-akcay/ganomaly at 78da4ea: ``lib/networks.py``, ``lib/model.py``,
``options.py``).

Networks (``networks.py``, module names kept, so the reference's ``netG.pth`` /
``netD.pth`` state_dicts load unchanged):

- Encoder (DCGAN): ``Conv(nc, ndf, 4, 2, 1)`` + LeakyReLU(0.2), then while the map is
  larger than 4×4 ``Conv(c, 2c, 4, 2, 1)`` + BatchNorm + LeakyReLU(0.2), then
  ``Conv(c, nz, 4, 1, 0)``: a 1×1 latent of ``nz`` = 100 values. No biases.
- Decoder: ``ConvT(nz, c, 4, 1, 0)`` + BatchNorm + ReLU, a pyramid of
  ``ConvT(c, c/2, 4, 2, 1)`` + BatchNorm + ReLU, ``ConvT(c, nc, 4, 2, 1)`` + Tanh.
- Generator: x → E₁ → z → Dec → x̂ → E₂ → ẑ. Discriminator: an Encoder with
  nz = 1; ``features`` = all but its last conv, ``classifier`` = last conv + Sigmoid.
- Init (``weights_init``): conv weights N(0, 0.02); BatchNorm weights N(1, 0.02),
  biases 0.

Training (``model.py:280-362``), per batch:

1. x̂, z, ẑ = G(x); D(x) and D(x̂.detach()) (train mode).
2. Generator step: L_G = w_adv·L_adv + w_con·L_con + w_enc·L_enc with
   L_adv = ‖f(x) − f(x̂)‖² (mean; feature matching on D's ``features``),
   L_con = |x − x̂| (mean; L1), L_enc = ‖z − ẑ‖² (mean); weights 1, 50, 1.
3. Discriminator step: L_D = ½[BCE(D(x), 1) + BCE(D(x̂.detach()), 0)] with the
   outputs of step 1; D is re-initialised when L_D < 1e-5.

Adam (lr 2e-4, β = (0.5, 0.999)) for each; training batches drop the last
partial batch (``lib/data.py``). ``adversarial="bce"`` and ``contextual="mse"``
give the variant of the MVTec wood study (adversarial BCE(D(x̂), 1) "to fool the
discriminator", MSE contextual loss); its schedule (batch 16, 300 epochs) is the
default, the reference's is batch 64, 15 epochs.

Input in [−1, 1] (``Normalize((.5,.5,.5), (.5,.5,.5))``, ``lib/data.py:161-164``),
matching the Tanh decoder (anomalib feeds ImageNet-normalised input instead).

Score: s = mean((z − ẑ)²) over the latent (``model.py:215``), min-max scaled with
the minimum and maximum of the **normal validation images'** scores, stored with
the model (the reference scales over the test set, ``model.py:239``; anomalib over
each evaluation epoch), networks in eval mode (the reference scores in train
mode, so BatchNorm uses test-batch statistics; ganomaly issue #97). GANomaly has
no anomaly map; pyad's map is the per-pixel contextual error |x − x̂| (squared
with ``contextual="mse"``), averaged over channels and blurred (σ = 4).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import training
from ..ops import gaussian_blur, sequential
from .base import register, stage
from .settings import check
from .trained import TrainedDetector


# -- the networks (lib/networks.py) --------------------------------------------------------------------
def weights_init(mod: nn.Module) -> None:
    """``networks.py:11-22``: conv weights N(0, 0.02), BatchNorm N(1, 0.02) and 0."""
    name = type(mod).__name__
    if "Conv" in name:
        mod.weight.data.normal_(0.0, 0.02)
    elif "BatchNorm" in name:
        mod.weight.data.normal_(1.0, 0.02)
        mod.bias.data.fill_(0)


class Encoder(nn.Module):
    """DCGAN encoder, [B, nc, S, S] -> [B, nz, 1, 1] (``networks.py:25-77``)."""

    def __init__(self, isize: int, nz: int, nc: int, ndf: int, n_extra_layers: int = 0, add_final_conv: bool = True):
        super().__init__()
        main = nn.Sequential()
        main.add_module(f"initial-conv-{nc}-{ndf}", nn.Conv2d(nc, ndf, 4, 2, 1, bias=False))
        main.add_module(f"initial-relu-{ndf}", nn.LeakyReLU(0.2, inplace=True))
        csize, cndf = isize / 2, ndf
        for t in range(n_extra_layers):
            main.add_module(f"extra-layers-{t}-{cndf}-conv", nn.Conv2d(cndf, cndf, 3, 1, 1, bias=False))
            main.add_module(f"extra-layers-{t}-{cndf}-batchnorm", nn.BatchNorm2d(cndf))
            main.add_module(f"extra-layers-{t}-{cndf}-relu", nn.LeakyReLU(0.2, inplace=True))
        while csize > 4:
            main.add_module(f"pyramid-{cndf}-{cndf * 2}-conv", nn.Conv2d(cndf, cndf * 2, 4, 2, 1, bias=False))
            main.add_module(f"pyramid-{cndf * 2}-batchnorm", nn.BatchNorm2d(cndf * 2))
            main.add_module(f"pyramid-{cndf * 2}-relu", nn.LeakyReLU(0.2, inplace=True))
            cndf, csize = cndf * 2, csize / 2
        if add_final_conv:
            main.add_module(f"final-{cndf}-{1}-conv", nn.Conv2d(cndf, nz, 4, 1, 0, bias=False))
        self.main = main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sequential(self.main, x)  # the weight-bound layers as GEMMs when predicting on the CPU (ops.conv)


class Decoder(nn.Module):
    """DCGAN decoder, [B, nz, 1, 1] -> [B, nc, S, S] in [−1, 1] (``networks.py:80-134``)."""

    def __init__(self, isize: int, nz: int, nc: int, ngf: int, n_extra_layers: int = 0):
        super().__init__()
        cngf, tisize = ngf // 2, 4
        while tisize != isize:
            cngf, tisize = cngf * 2, tisize * 2
        main = nn.Sequential()
        main.add_module(f"initial-{nz}-{cngf}-convt", nn.ConvTranspose2d(nz, cngf, 4, 1, 0, bias=False))
        main.add_module(f"initial-{cngf}-batchnorm", nn.BatchNorm2d(cngf))
        main.add_module(f"initial-{cngf}-relu", nn.ReLU(True))
        csize = 4
        while csize < isize // 2:
            main.add_module(f"pyramid-{cngf}-{cngf // 2}-convt", nn.ConvTranspose2d(cngf, cngf // 2, 4, 2, 1, bias=False))
            main.add_module(f"pyramid-{cngf // 2}-batchnorm", nn.BatchNorm2d(cngf // 2))
            main.add_module(f"pyramid-{cngf // 2}-relu", nn.ReLU(True))
            cngf, csize = cngf // 2, csize * 2
        for t in range(n_extra_layers):
            main.add_module(f"extra-layers-{t}-{cngf}-conv", nn.Conv2d(cngf, cngf, 3, 1, 1, bias=False))
            main.add_module(f"extra-layers-{t}-{cngf}-batchnorm", nn.BatchNorm2d(cngf))
            main.add_module(f"extra-layers-{t}-{cngf}-relu", nn.ReLU(True))
        main.add_module(f"final-{cngf}-{nc}-convt", nn.ConvTranspose2d(cngf, nc, 4, 2, 1, bias=False))
        main.add_module(f"final-{nc}-tanh", nn.Tanh())
        self.main = main

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return sequential(self.main, z)  # the weight-bound layers as GEMMs when predicting on the CPU (ops.conv)


class NetG(nn.Module):
    """x -> (x̂, z, ẑ) (``networks.py:161-176``)."""

    def __init__(self, isize: int, nz: int = 100, nc: int = 3, ngf: int = 64, n_extra_layers: int = 0):
        super().__init__()
        self.encoder1 = Encoder(isize, nz, nc, ngf, n_extra_layers)
        self.decoder = Decoder(isize, nz, nc, ngf, n_extra_layers)
        self.encoder2 = Encoder(isize, nz, nc, ngf, n_extra_layers)

    def forward(self, x: torch.Tensor):
        latent_i = self.encoder1(x)
        gen_imag = self.decoder(latent_i)
        latent_o = self.encoder2(gen_imag)
        return gen_imag, latent_i, latent_o


class NetD(nn.Module):
    """x -> (probability of real [B], features [B, C, 4, 4]) (``networks.py:138-158``)."""

    def __init__(self, isize: int, nc: int = 3, ndf: int = 64, n_extra_layers: int = 0):
        super().__init__()
        layers = list(Encoder(isize, 1, nc, ndf, n_extra_layers).main.children())
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = nn.Sequential(layers[-1])
        self.classifier.add_module("Sigmoid", nn.Sigmoid())

    def forward(self, x: torch.Tensor):
        features = self.features(x)
        classifier = self.classifier(features).view(-1, 1).squeeze(1)
        return classifier, features


# -- losses (lib/model.py:280-336, lib/loss.py) ----------------------------------------------------------
def bce(p: torch.Tensor, target: float) -> torch.Tensor:
    """``nn.BCELoss()(p, full(target))`` (the reference's loss), computed in float32 with
    autocast off (torch refuses ``binary_cross_entropy`` under autocast). torch's own
    backward matters: a hand-written −log(1 − p) clamped at −100 has the gradient
    0 · ∞ = NaN once the discriminator's sigmoid saturates to exactly 1.0, which a
    confident D reaches within a few epochs (bottle, 64 px: step 70)."""
    with torch.autocast(p.device.type, enabled=False):
        p = p.float()
        return nn.functional.binary_cross_entropy(p, torch.full_like(p, float(target)))


def generator_loss(netd: NetD, x, fake, latent_i, latent_o, *, adversarial: str = "feature", contextual: str = "l1",
                   w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0):
    """(L_G, (L_adv, L_con, L_enc)). adversarial "feature": mean ‖f(x) − f(x̂)‖²
    over D's features (the reference's ``l2_loss``); "bce": BCE(D(x̂), 1).
    contextual "l1": mean |x̂ − x|; "mse": mean (x̂ − x)². L_enc: mean (ẑ − z)²."""
    if adversarial == "feature":
        adv = (netd(x)[1] - netd(fake)[1]).square().mean()
    else:
        adv = bce(netd(fake)[0], 1.0)
    con = (fake - x).abs().mean() if contextual == "l1" else (fake - x).square().mean()
    enc = (latent_o - latent_i).square().mean()
    return w_adv * adv + w_con * con + w_enc * enc, (adv, con, enc)


def discriminator_loss(pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """½[BCE(D(x), 1) + BCE(D(x̂), 0)] (``model.py:327-336``)."""
    return 0.5 * (bce(pred_real, 1.0) + bce(pred_fake, 0.0))


def latent_distance(latent_i: torch.Tensor, latent_o: torch.Tensor) -> torch.Tensor:
    """The raw anomaly score mean((z − ẑ)²) over the latent, [B] (``model.py:215``)."""
    return (latent_i - latent_o).square().flatten(1).mean(1)


# -- inference ---------------------------------------------------------------------------------------
class GANomalyModule(nn.Module):
    """[B, 3, S, S] in [−1, 1] -> (scores [B], maps [B, S, S]): the latent distance,
    min-max scaled with the validation statistics (buffers), and the blurred
    per-pixel contextual error."""

    def __init__(self, netg: NetG, score_min: float, score_max: float, contextual: str, blur_sigma: float):
        super().__init__()
        self.netg, self.contextual, self.blur_sigma = netg, contextual, blur_sigma
        span = score_max - score_min
        self.register_buffer("score_min", torch.tensor(float(score_min)))
        self.register_buffer("score_span", torch.tensor(float(span) if span > 0 else 1.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fake, latent_i, latent_o = self.netg(x)
        stage("backbone")  # the generator: encoder, decoder, encoder
        scores = (latent_distance(latent_i, latent_o) - self.score_min) / self.score_span
        err = (x - fake).abs() if self.contextual == "l1" else (x - fake).square()
        maps = gaussian_blur(err.mean(1), self.blur_sigma)
        stage("map")
        return scores, maps


# -- the detector -----------------------------------------------------------------------------------------
@register("ganomaly")
class GANomaly(TrainedDetector):
    """GANomaly. ``networks_["netg"]`` and ``networks_["netd"]`` after fit;
    ``score_min_`` / ``score_max_``: the raw-score statistics the scores are scaled
    with (normal validation images; the training images when there are none).

    latent_dim: nz (100); ngf, ndf: generator / discriminator widths (64; the
        reference builds D with ngf, equal by default); extra_layers: 0.
    adversarial: "feature" (feature matching, reference) or "bce" (the wood study);
    contextual: "l1" (reference) or "mse" (the wood study).
    w_adv, w_con, w_enc: loss weights (1, 50, 1). beta1: Adam's β₁ (0.5).
    reinit_below: D is re-initialised when its loss falls below this (1e-5).
    blur_sigma: Gaussian blur of the map (4; 0: none).
    ``early_stopping_patience`` watches w_con·L_con + w_enc·L_enc on the normal
    validation images (off by default, as in both sources).
    """

    defaults = dict(image_size=256, batch_size=16, max_epochs=300, lr=2e-4)

    def __init__(self, *, latent_dim=100, ngf=64, ndf=64, extra_layers=0, adversarial="feature", contextual="l1",
                 w_adv=1.0, w_con=50.0, w_enc=1.0, beta1=0.5, reinit_below=1e-5, blur_sigma=4.0, **common):
        super().__init__(**common)
        self.latent_dim = latent_dim
        self.ngf = ngf
        self.ndf = ndf
        self.extra_layers = extra_layers
        self.adversarial = adversarial
        self.contextual = contextual
        self.w_adv = w_adv
        self.w_con = w_con
        self.w_enc = w_enc
        self.beta1 = beta1
        self.reinit_below = reinit_below
        self.blur_sigma = blur_sigma

    def _check_own_params(self):
        def pos_int(v, lo=1):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        size = self.preprocessing.size
        check(size % 16 == 0, "image_size", "a network input size divisible by 16 (the DCGAN pyramid)", size)
        check(pos_int(self.latent_dim), "latent_dim", "a positive int", self.latent_dim)
        check(pos_int(self.ngf, 2) and self.ngf % 2 == 0, "ngf", "an even int >= 2", self.ngf)
        check(pos_int(self.ndf), "ndf", "a positive int", self.ndf)
        check(pos_int(self.extra_layers, 0), "extra_layers", "an int >= 0", self.extra_layers)
        check(self.adversarial in ("feature", "bce"), "adversarial", "'feature' or 'bce'", self.adversarial)
        check(self.contextual in ("l1", "mse"), "contextual", "'l1' or 'mse'", self.contextual)
        for name in ("w_adv", "w_con", "w_enc"):
            check(lambda: getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))
        check(lambda: 0 <= self.beta1 < 1, "beta1", "a number in [0, 1)", self.beta1)
        check(lambda: self.reinit_below >= 0, "reinit_below", "a number >= 0", self.reinit_below)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)

    def _normalisation(self):
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # [-1, 1], as the reference's Normalize

    def _networks(self):
        s = self.preprocessing.size
        netg = NetG(s, self.latent_dim, 3, self.ngf, self.extra_layers)
        netd = NetD(s, 3, self.ndf, self.extra_layers)
        netg.apply(weights_init)
        netd.apply(weights_init)
        return {"netg": netg, "netd": netd}

    def _build_module(self):
        return GANomalyModule(self.networks_["netg"], self.score_min_, self.score_max_, self.contextual,
                              self.blur_sigma)

    # -- training ---------------------------------------------------------------------------------------
    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        netg, netd = nets["netg"], nets["netd"]
        betas = (self.beta1, 0.999)
        opts = {"g": training.optimizer("adam", netg.parameters(), self.lr, betas=betas),
                "d": training.optimizer("adam", netd.parameters(), self.lr, betas=betas)}
        run = training.Run(self.name, modules=nets, optimizers=opts, max_epochs=self.max_epochs,
                           max_steps=self.max_steps, checkpoint=checkpoint, device=self.device, amp=self.amp,
                           early_stopping_patience=self.early_stopping_patience if len(val) else None,
                           settings=self.run_settings())
        batches = training.Batches(len(train), self.batch_size, self.seed, drop_last=True)
        losses = dict(adversarial=self.adversarial, contextual=self.contextual, w_adv=self.w_adv, w_con=self.w_con,
                      w_enc=self.w_enc)
        reinits = 0
        for epoch in run.epochs():
            netg.train()
            netd.train()
            for idx in run.each(batches.epoch(epoch)):
                x = self.to_input(train[torch.from_numpy(idx)])
                with run.autocast():
                    fake, latent_i, latent_o = netg(x)  # forward_g
                    pred_real, _ = netd(x)  # forward_d
                    pred_fake, _ = netd(fake.detach())
                    err_g, (adv, con, enc) = generator_loss(netd, x, fake, latent_i, latent_o, **losses)
                run.backward(err_g, "g")  # G first (model.py:354-356)
                opts["d"].zero_grad(set_to_none=True)  # drop what L_G left in D's gradients
                err_d = discriminator_loss(pred_real, pred_fake)
                run.backward(err_d, "d")
                if err_d.item() < self.reinit_below:  # model.py:362
                    netd.apply(weights_init)
                    reinits += 1
                run.log(err_g=err_g, err_d=err_d, adv=adv, con=con, enc=enc)
            if len(val) and self.early_stopping_patience:
                if run.validate(self._val_loss(netg, val)):
                    break
        run.finish()
        self.history_ = run.history
        self.d_reinits_ = reinits
        netg.eval()
        source = val if len(val) else train
        raw = self._raw_scores(netg, source)
        self.score_min_, self.score_max_ = float(raw.min()), float(raw.max())
        self.score_stats_ = (f"min-max of the latent distances of {len(source)} "
                             f"{'normal validation' if len(val) else 'training (no validation images)'} images")
        return None

    @torch.no_grad()
    def _raw_scores(self, netg: NetG, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            _, zi, zo = netg(self.to_input(images[start : start + self.batch_size]))
            out.append(latent_distance(zi, zo).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _val_loss(self, netg: NetG, val: torch.Tensor) -> float:
        netg.eval()
        total, n = 0.0, 0
        for start in range(0, len(val), self.batch_size):
            x = self.to_input(val[start : start + self.batch_size])
            fake, zi, zo = netg(x)
            con = (fake - x).abs().mean() if self.contextual == "l1" else (fake - x).square().mean()
            total += float(self.w_con * con + self.w_enc * (zo - zi).square().mean()) * len(x)
            n += len(x)
        netg.train()
        return total / n

    def _buffers(self):
        return {"score_min": self.score_min_, "score_max": self.score_max_, "score_stats": self.score_stats_,
                "history": getattr(self, "history_", []), "d_reinits": getattr(self, "d_reinits_", 0)}

    def _load_buffers(self, state):
        self.score_min_ = float(state["score_min"])
        self.score_max_ = float(state["score_max"])
        self.score_stats_ = state.get("score_stats", "")
        self.history_ = state.get("history", [])
        self.d_reinits_ = state.get("d_reinits", 0)
