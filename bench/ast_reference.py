"""The official AST code path (marco-rudolph/AST @8c243ad) as its repository runs it
without pre-extracted features (``config.pre_extracted = False``), re-typed for the
benchmark: the same operations in the same order, written independently of
``pyad.detectors.ast`` so that the benchmark's equality check means something.

- ``Model`` (``model.py`` l.82-121): each model (teacher and student) owns a feature
  extractor and runs it on every call under ``no_grad``; ``model.train()`` also puts
  that extractor in train mode (BatchNorm batch statistics), as the repository does.
- The flow is the FrEIA graph of ``freia_funcs.py``: permute_layer (np.random.seed(k))
  -> glow_coupling_layer_cond (soft clamp, F_conv subnets with γ) x n_blocks, the
  log-determinant collected from each coupling's ``last_jac``.
- ``train_teacher`` / ``train_student`` (``train_teacher.py`` l.12-46,
  ``train_student.py`` l.12-54): Adam(lr 2e-4, eps 1e-8, wd 1e-5), the student phase
  runs the teacher (with its own backbone pass) on every batch.
- ``evaluate`` (``eval.py`` l.23-66): teacher and student each run their backbone,
  map = mean_c (z_T − z_S)², bicubic ×8, score = max.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def positionalencoding2d(D, H, W):
    P = torch.zeros(D, H, W)
    D = D // 2
    div_term = torch.exp(torch.arange(0.0, D, 2) * -(np.log(1e4) / D))
    pos_w = torch.arange(0.0, W).unsqueeze(1)
    pos_h = torch.arange(0.0, H).unsqueeze(1)
    P[0:D:2, :, :] = torch.sin(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, H, 1)
    P[1:D:2, :, :] = torch.cos(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, H, 1)
    P[D::2, :, :] = torch.sin(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, W)
    P[D + 1::2, :, :] = torch.cos(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, W)
    return P[None]


class PermuteLayer(nn.Module):
    def __init__(self, channels, seed):
        super().__init__()
        np.random.seed(seed)
        self.perm = torch.LongTensor(np.random.permutation(channels))
        np.random.seed()

    def forward(self, x):
        return x[:, self.perm]


class FConv(nn.Module):
    def __init__(self, in_channels, channels, channels_hidden, kernel_size):
        super().__init__()
        pad = kernel_size // 2
        self.gamma = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(in_channels, channels_hidden, kernel_size, padding=pad, padding_mode="replicate")
        self.conv2 = nn.Conv2d(channels_hidden, channels, kernel_size, padding=pad, padding_mode="replicate")
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x))) * self.gamma


class GlowCouplingCond(nn.Module):
    def __init__(self, channels, cond_dim, channels_hidden, kernel_size, clamp):
        super().__init__()
        self.split_len1, self.split_len2 = channels // 2, channels - channels // 2
        self.clamp = clamp
        self.s1 = FConv(self.split_len1 + cond_dim, self.split_len2 * 2, channels_hidden, kernel_size)
        self.s2 = FConv(self.split_len2 + cond_dim, self.split_len1 * 2, channels_hidden, kernel_size)

    def e(self, s):
        return torch.exp(self.log_e(s))

    def log_e(self, s):
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def forward(self, x, cond):
        x1, x2 = x.narrow(1, 0, self.split_len1), x.narrow(1, self.split_len1, self.split_len2)
        r2 = self.s2(torch.cat([x2, cond], dim=1))
        s2, t2 = torch.split(r2, r2.shape[1] // 2, 1)
        y1 = self.e(s2) * x1 + t2
        r1 = self.s1(torch.cat([y1, cond], dim=1))
        s1, t1 = torch.split(r1, r1.shape[1] // 2, 1)
        y2 = self.e(s1) * x2 + t1
        y = torch.clamp(torch.cat((y1, y2), 1), -1e6, 1e6)
        self.last_jac = torch.sum(self.log_e(s1), dim=1) + torch.sum(self.log_e(s2), dim=1)
        return y


class NF(nn.Module):
    def __init__(self, n_feat, pos_enc_dim, channels_hidden, clamp, kernel_sizes):
        super().__init__()
        mods = []
        for k, ks in enumerate(kernel_sizes):
            mods += [PermuteLayer(n_feat, k), GlowCouplingCond(n_feat, pos_enc_dim, channels_hidden, ks, clamp)]
        self.module_list = nn.ModuleList(mods)

    def forward(self, inputs):
        cond, x = inputs
        for m in self.module_list:
            x = m(x) if isinstance(m, PermuteLayer) else m(x, cond)
        return x

    def jacobian(self):
        return sum(m.last_jac for m in self.module_list if isinstance(m, GlowCouplingCond))


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.l1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.l2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU()
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        inp = x
        x = self.act(self.bn1(self.l1(x)))
        x = self.act(self.bn2(self.l2(x)))
        return x + inp


class StudentNet(nn.Module):
    def __init__(self, n_feat, pos_enc_dim, channels_hidden, n_blocks):
        super().__init__()
        self.conv1 = nn.Conv2d(n_feat + pos_enc_dim, channels_hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels_hidden, n_feat, kernel_size=3, padding=1)
        self.res = nn.ModuleList([ResBlock(channels_hidden) for _ in range(n_blocks)])
        self.act = nn.LeakyReLU()

    def forward(self, x):
        x = self.act(self.conv1(torch.cat(x, dim=1)))
        for block in self.res:
            x = block(x)
        return self.conv2(x)


class Model(nn.Module):
    """``model.py`` Model with ``pre_extracted = False``: its own feature extractor."""

    def __init__(self, extractor: nn.Module, layer: str, n_feat: int, map_len: int, nf: bool, cfg: dict):
        super().__init__()
        self.feature_extractor = copy.deepcopy(extractor)
        self.layer = layer
        if nf:
            self.net = NF(n_feat, cfg["pos_enc_dim"], cfg["teacher_hidden"], cfg["clamp"], cfg["kernels"])
        else:
            self.net = StudentNet(n_feat, cfg["pos_enc_dim"], cfg["student_hidden"], cfg["student_blocks"])
        self.register_buffer("pos_enc", positionalencoding2d(cfg["pos_enc_dim"], map_len, map_len))

    def forward(self, x):
        with torch.no_grad():
            f = self.feature_extractor(x)[self.layer]
        cond = self.pos_enc.tile(f.shape[0], 1, 1, 1)
        z = self.net([cond, f])
        jac = self.net.jacobian() if isinstance(self.net, NF) else 0
        return z, jac


def get_nf_loss(z, jac):
    return torch.mean(0.5 * torch.sum(z ** 2, dim=1) - jac, dim=(-1, -2)).mean()


def get_st_loss(target, output):
    return torch.mean(torch.mean((target - output) ** 2, dim=1), dim=(-1, -2)).mean()


def train_teacher_epoch(teacher: Model, opt, loader) -> float:
    teacher.train()
    losses = []
    for image in loader:
        opt.zero_grad()
        z, jac = teacher(image)
        loss = get_nf_loss(z, jac)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def train_student_epoch(student: Model, teacher: Model, opt, loader) -> float:
    student.train()
    teacher.eval()
    losses = []
    for image in loader:
        opt.zero_grad()
        with torch.no_grad():
            z_t, _ = teacher(image)
        z, _ = student(image)
        loss = get_st_loss(z_t, z)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(teacher: Model, student: Model, image: torch.Tensor):
    """(image scores, maps at 8× the feature resolution), ``eval.py`` l.49-60."""
    teacher.eval()
    student.eval()
    z_t, _ = teacher(image)
    z, _ = student(image)
    st_pixel = torch.mean((z_t - z) ** 2, dim=1)
    st_pixel = F.interpolate(st_pixel[:, None], scale_factor=8, mode="bicubic", align_corners=False)[:, 0]
    return st_pixel.flatten(1).amax(1), st_pixel


def adam(model: Model, lr: float = 2e-4):
    return torch.optim.Adam(model.net.parameters(), lr=lr, eps=1e-08, weight_decay=1e-5)


def load_pyad_weights(model: Model, net: nn.Module) -> None:
    """Copy a pyad FlowTeacher / Student's weights into the reference network (the
    layouts differ only in names: pyad couplings k <-> module_list 2k+1)."""
    src = net.state_dict()
    dst = model.net.state_dict()
    if isinstance(model.net, NF):
        mapping = {k: f"module_list.{2 * int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}" for k in src}
    else:
        mapping = {k: k for k in src}
    model.net.load_state_dict({mapping[k]: v for k, v in src.items() if mapping[k] in dst}, strict=True)
