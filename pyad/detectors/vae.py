"""Variational autoencoder (the reconstruction model "Model 6" of the MVTec AD wood
study: Keras, 256×256 grey input in [0, 1], reconstruction + β·KL with β = 1, Adam
1e-4, batch 16, up to 100 epochs with early stopping and learning-rate reduction
on plateau of the validation loss).

Network (Kingma & Welling, ICLR 2014, §2.4 and appendix C): encoder of four
stride-2 3×3 convolutions, each Conv → BatchNorm → LeakyReLU, to a 16×16 grid at
256 px; flatten; two dense heads μ and log σ². Decoder: dense → reshape to the
16×16×``widths[-1]`` grid (16×16×64, as the source), three stride-2 transposed
convolutions with BatchNorm and LeakyReLU, and a fourth to the input channels with
a sigmoid. Unstated in the source and filled with Keras's usual values: 3×3
kernels, "same" padding, LeakyReLU slope 0.3 (Keras's default), BatchNorm ε 1e-3
(Keras's), widths (32, 64, 64, 64), a 128-d latent, a LeakyReLU after the
decoder's dense layer. BatchNorm running averages use PyTorch's momentum 0.1
(``bn_momentum``), not Keras's 0.99 average (``bn_momentum=0.01``): within a CPU
budget of a few hundred steps the slow average lags the weights, and the
eval-mode network reconstructs far worse than the trained one (measured on
bottle after 300 steps: validation loss 35,947 with the lagging statistics,
24,440 with exact ones).

Loss per image (Kingma & Welling eq. 10; the Keras VAE example's "scaled"
reconstruction term): the reconstruction error summed over pixels, binary
cross-entropy (``reconstruction="bce"``, default) or squared error ("mse"), plus
β·KL(q(z|x) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²); averaged over the batch.
Training samples z = μ + σ·ε (reparameterisation); the validation loss (early
stopping, ReduceLROnPlateau) and inference use z = μ, so scores are deterministic.

Map: per-pixel squared error of the reconstruction from μ (mean over channels),
optionally blurred. Image score: ``score="mean"`` (the image MSE), "topk" (mean of
the top ``topk`` share of the map), or "elbo" (the training loss of the image at
z = μ: reconstruction term + β·KL, i.e. "reconstruction error plus the KL term").
Which separates better was measured on synthetic anomalies added to the normal
validation images (docs/detectors/vae.md). The source's "optimal threshold" was
chosen on test data; pyad's comes from validation images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import training
from ..ops import gaussian_blur
from .autoencoder import image_score, to_grey
from .base import register, stage
from .settings import check
from .trained import TrainedDetector


def _bn(c: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=momentum)  # Keras's epsilon


class VAENet(nn.Module):
    """[B, C, S, S] in [0, 1] -> (reconstruction [B, C, S, S], μ [B, L], log σ² [B, L])."""

    def __init__(self, channels: int = 1, size: int = 256, widths=(32, 64, 64, 64), latent_dim: int = 128,
                 slope: float = 0.3, bn_momentum: float = 0.1):
        super().__init__()
        enc, c = [], channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 3, 2, 1), _bn(w, bn_momentum), nn.LeakyReLU(slope)]
            c = w
        self.encoder = nn.Sequential(*enc)
        self.grid = size // 2 ** len(widths)
        self.top = c
        flat = c * self.grid * self.grid
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.dense = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(slope))
        dec = []
        for w in reversed(widths[:-1]):
            dec += [nn.ConvTranspose2d(c, w, 3, 2, 1, output_padding=1), _bn(w, bn_momentum), nn.LeakyReLU(slope)]
            c = w
        dec += [nn.ConvTranspose2d(c, channels, 3, 2, 1, output_padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dense(z).view(-1, self.top, self.grid, self.grid))

    def forward(self, x: torch.Tensor, sample: bool = False):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return self.decode(z), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per row, [B, L] -> [B]: −½ Σ (1 + log σ² − μ² − σ²)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)


def reconstruction_error(recon: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, summed over pixels and channels, [B]: binary cross-entropy (log
    clamped at −100, as torch's BCE) or squared error. Pure torch (exportable)."""
    if kind == "bce":
        err = -(x * torch.clamp(torch.log(recon), min=-100) + (1 - x) * torch.clamp(torch.log1p(-recon), min=-100))
    else:
        err = (recon - x).square()
    return err.flatten(1).sum(1)


def vae_loss(recon, x, mu, logvar, beta: float, kind: str) -> torch.Tensor:
    """The negative ELBO averaged over the batch: reconstruction + β·KL. The BCE is torch's
    (autocast off), whose backward stays finite where the sigmoid output saturates to
    exactly 0 or 1; the clamped logs of ``reconstruction_error`` (the exportable scoring
    path) would give 0 · ∞ = NaN gradients there."""
    recon, x = recon.float(), x.float()
    if kind == "bce":
        with torch.autocast(recon.device.type, enabled=False):
            rec = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1)
    else:
        rec = reconstruction_error(recon, x, kind)
    return (rec + beta * kl_divergence(mu.float(), logvar.float())).mean()


class VAEModule(nn.Module):
    def __init__(self, net: VAENet, grey: bool, score: str, topk: float, blur_sigma: float, beta: float,
                 reconstruction: str):
        super().__init__()
        self.net, self.grey, self.score, self.topk = net, grey, score, topk
        self.blur_sigma, self.beta, self.reconstruction = blur_sigma, beta, reconstruction

    def forward(self, x: torch.Tensor):
        x = to_grey(x) if self.grey else x
        recon, mu, logvar = self.net(x)  # z = μ: deterministic
        stage("backbone")
        maps = gaussian_blur((x - recon).square().mean(1), self.blur_sigma)
        if self.score == "elbo":
            scores = reconstruction_error(recon, x, self.reconstruction) + self.beta * kl_divergence(mu, logvar)
        else:
            scores = image_score(maps, self.score, self.topk)
        stage("map")
        return scores, maps


@register("vae")
class VAE(TrainedDetector):
    """The seed's variational autoencoder. ``networks_["vae"]`` after fit.

    grey: model the grey image (the source) or RGB.
    latent_dim, widths: the latent size and the encoder's convolution widths
        (the decoder mirrors them).
    beta: weight of the KL term (1: the plain VAE, as the source).
    reconstruction: "bce" (summed binary cross-entropy) or "mse" (summed squared error).
    score: "mean", "topk" or "elbo" (see the module doc); topk: the share of pixels.
    blur_sigma: Gaussian blur of the map (0: none).
    plateau_patience, plateau_factor: ReduceLROnPlateau on the validation loss.
    bn_momentum: BatchNorm running-average momentum (PyTorch convention; Keras's
        default 0.99 is 0.01 here).
    """

    defaults = dict(max_epochs=100, lr=1e-4, batch_size=16, early_stopping_patience=10)
    resume_across = frozenset({"score", "topk", "blur_sigma"})  # scoring only

    def __init__(self, *, grey=True, latent_dim=128, widths=(32, 64, 64, 64), beta=1.0, reconstruction="bce",
                 score="topk", topk=0.05, blur_sigma=4.0, plateau_patience=5, plateau_factor=0.5, bn_momentum=0.1,
                 **common):
        super().__init__(**common)
        self.grey = grey
        self.latent_dim = latent_dim
        self.widths = tuple(widths) if isinstance(widths, list) else widths
        self.beta = beta
        self.reconstruction = reconstruction
        self.score = score
        self.topk = topk
        self.blur_sigma = blur_sigma
        self.plateau_patience = plateau_patience
        self.plateau_factor = plateau_factor
        self.bn_momentum = bn_momentum

    def _check_own_params(self):
        check(isinstance(self.grey, bool), "grey", "True or False", self.grey)
        check(isinstance(self.latent_dim, int) and not isinstance(self.latent_dim, bool) and self.latent_dim >= 1,
              "latent_dim", "a positive int", self.latent_dim)
        check(isinstance(self.widths, tuple) and len(self.widths) >= 1
              and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.widths),
              "widths", "a non-empty tuple of positive ints", self.widths)
        check(lambda: self.beta >= 0 and not isinstance(self.beta, bool), "beta", "a number >= 0", self.beta)
        check(self.reconstruction in ("bce", "mse"), "reconstruction", "'bce' or 'mse'", self.reconstruction)
        check(self.score in ("mean", "topk", "elbo"), "score", "'mean', 'topk' or 'elbo'", self.score)
        check(lambda: 0 < self.topk <= 1, "topk", "a share in (0, 1]", self.topk)
        check(lambda: self.blur_sigma >= 0, "blur_sigma", "a number >= 0", self.blur_sigma)
        check(isinstance(self.plateau_patience, int) and not isinstance(self.plateau_patience, bool)
              and self.plateau_patience >= 1, "plateau_patience", "an int >= 1", self.plateau_patience)
        check(lambda: 0 < self.plateau_factor < 1, "plateau_factor", "a number in (0, 1)", self.plateau_factor)
        check(lambda: 0 < self.bn_momentum <= 1, "bn_momentum", "a number in (0, 1]", self.bn_momentum)
        step = 2 ** len(self.widths)
        check(self.preprocessing.size % step == 0, "image_size", f"a size divisible by {step} "
              f"({len(self.widths)} stride-2 convolutions)", self.preprocessing.size)

    def _normalisation(self):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # input in [0, 1] (sigmoid output, BCE target)

    def _networks(self):
        return {"vae": VAENet(1 if self.grey else 3, self.preprocessing.size, self.widths, self.latent_dim,
                              bn_momentum=self.bn_momentum)}

    def _module(self, net, score=None):
        return VAEModule(net, self.grey, score or self.score, self.topk, self.blur_sigma, self.beta,
                         self.reconstruction)

    def _build_module(self):
        return self._module(self.networks_["vae"])

    def _input(self, u8: torch.Tensor) -> torch.Tensor:
        x = self.to_input(u8)
        return to_grey(x) if self.grey else x

    def _train(self, nets, train, val, *, labels=None, checkpoint=None):
        vae = nets["vae"]
        opt = training.optimizer("adam", vae.parameters(), self.lr)
        plateau = training.scheduler("plateau", opt, patience=self.plateau_patience, factor=self.plateau_factor)
        run = training.Run(self.name, modules=nets, optimizers={"adam": opt},
                           schedulers={"plateau": plateau} if len(val) else None, max_epochs=self.max_epochs,
                           max_steps=self.max_steps, checkpoint=checkpoint, device=self.device, amp=self.amp,
                           early_stopping_patience=self.early_stopping_patience if len(val) else None,
                           settings=self.run_settings())
        batches = training.Batches(len(train), self.batch_size, self.seed)
        # channels-last on the CPU: oneDNN's stride-2 and transposed convolutions train 1.4x
        # faster (a bottle step of 16 images at 256 px: 1,100 -> 770 ms on 2 AVX2 cores);
        # the fitted network is stored and run in the default layout
        layout = torch.channels_last if torch.device(self.device).type == "cpu" else torch.contiguous_format
        vae.to(memory_format=layout)
        for epoch in run.epochs():
            vae.train()
            for idx in run.each(batches.epoch(epoch)):
                x = self._input(train[torch.from_numpy(idx)])
                with run.autocast():
                    recon, mu, logvar = vae(x, sample=True)
                loss = vae_loss(recon, x, mu, logvar, self.beta, self.reconstruction)
                run.backward(loss)
                run.log(loss=loss)
            if len(val) and run.validate(self._val_loss(vae, val)):
                break
        run.finish()
        vae.to(memory_format=torch.contiguous_format)
        self.history_ = run.history
        return None

    @torch.no_grad()
    def _val_loss(self, vae, val) -> float:
        """The loss on the normal validation images at z = μ (deterministic)."""
        vae.eval()
        total = 0.0
        for start in range(0, len(val), self.batch_size):
            x = self._input(val[start : start + self.batch_size])
            recon, mu, logvar = vae(x)
            total += vae_loss(recon, x, mu, logvar, self.beta, self.reconstruction).item() * len(x)
        return total / len(val)

    def _buffers(self):
        return {"history": getattr(self, "history_", [])}

    def _load_buffers(self, state):
        self.history_ = state.get("history", [])
