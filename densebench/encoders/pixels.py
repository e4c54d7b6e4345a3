"""``pixels``: a non-learned per-patch colour and texture descriptor.

It is the floor a learned encoder has to beat: it knows what colour a patch is, how much that colour
varies, which way its edges run and how fine its texture is, and nothing else (no context, no parts,
no semantics). Being deterministic and weight-free it also runs everywhere, offline, in milliseconds, which
makes it the encoder of the embedded default run and of protocol tests.

Per patch (``patch_size`` pixels square) the 16 dimensions are:

* 0-2: mean CIE Lab (L centred on 50), 3-5: standard deviation of L, a, b;
* 6-13: a gradient-orientation histogram (8 unsigned bins over [0, pi), soft-assigned, magnitude-weighted,
  HOG-style on the Lab channel with the strongest gradient), normalised to a distribution and scaled by how
  textured the patch is, so flat patches have no orientation signal;
* 14: gradient energy (log), 15: fineness (mean |Laplacian| / mean |gradient|, grows with the texture's
  spatial frequency).

Each group is scaled to roughly unit range so cosine similarity weighs colour and texture comparably.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import DenseEncoder

N_ORIENT = 8
# ImageNet-normalised input -> Lab: the white point and sRGB->XYZ matrix (D65) of IEC 61966-2-1.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)
_TEXTURE_TAU = 0.02   # gradient magnitude (Lab/100 units per pixel) at which a patch counts as half textured


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (B, 3, H, W) -> CIE Lab (L in [0, 100], a/b roughly [-128, 127])."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(0) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _filter(x: torch.Tensor, kernel: list[list[float]]) -> torch.Tensor:
    """Depthwise 3x3 filter with replicate padding (no artificial edges at the image border)."""
    c = x.shape[1]
    k = torch.tensor(kernel, dtype=x.dtype, device=x.device).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)


class PixelsEncoder(DenseEncoder):
    """The non-learned colour/texture floor (see module docstring). ``layer``/``norm`` do not apply."""

    VERSION = 1

    def __init__(self, patch_size: int = 16, *, layer: int = -1, norm: bool = True):
        super().__init__(layer=layer, norm=norm)
        if not 2 <= patch_size <= 256:
            raise ConfigError(f"pixels patch size {patch_size} is out of range",
                              hint="use pixels:<p> with 2 <= p <= 256")
        self.patch_size = int(patch_size)
        self.embed_dim = 6 + N_ORIENT + 2
        self.name = "pixels" if patch_size == 16 else f"pixels:{patch_size}"
        self.fingerprint = f"pixels-v{self.VERSION}:p{patch_size}"
        self.native_size = None

    def _features(self, images: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        p = self.patch_size
        x = images.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        lab = rgb_to_lab((x * std + mean).clamp(0, 1))

        # colour: per-patch mean and standard deviation of L, a, b
        mu = F.avg_pool2d(lab, p)
        var = (F.avg_pool2d(lab * lab, p) - mu * mu).clamp_min(0)
        colour = torch.cat([(mu[:, :1] - 50) / 25, mu[:, 1:] / 25, var.sqrt() / 15], dim=1)

        # texture: HOG-style orientations on the Lab channel with the strongest gradient at each pixel
        s = lab / 100
        sobel_x = [[-1 / 8, 0, 1 / 8], [-2 / 8, 0, 2 / 8], [-1 / 8, 0, 1 / 8]]
        gx, gy = _filter(s, sobel_x), _filter(s, [list(r) for r in zip(*sobel_x)])
        mag_c = torch.sqrt(gx * gx + gy * gy)
        best = mag_c.argmax(dim=1, keepdim=True)
        gx, gy, mag = gx.gather(1, best), gy.gather(1, best), mag_c.gather(1, best)
        theta = torch.atan2(gy, gx).remainder(math.pi)                     # unsigned orientation
        pos = theta / (math.pi / N_ORIENT) - 0.5                            # bin centres at (k + 0.5) * pi/8
        lo = pos.floor()
        frac = pos - lo
        lo_i = lo.long().remainder(N_ORIENT)
        hi_i = (lo_i + 1).remainder(N_ORIENT)
        hist = (F.one_hot(lo_i[:, 0], N_ORIENT) * ((1 - frac) * mag)[:, 0, ..., None]
                + F.one_hot(hi_i[:, 0], N_ORIENT) * (frac * mag)[:, 0, ..., None]).permute(0, 3, 1, 2)
        mag_p = F.avg_pool2d(mag, p)
        hist_p = F.avg_pool2d(hist, p) / (mag_p + 1e-8)
        textured = mag_p / (mag_p + _TEXTURE_TAU)
        lap = _filter(s, [[0, 1, 0], [1, -4, 1], [0, 1, 0]]).abs().amax(dim=1, keepdim=True)
        fineness = F.avg_pool2d(lap, p) / (mag_p + 1e-8)
        texture = torch.cat([2 * hist_p * textured,
                             torch.log1p(mag_p / _TEXTURE_TAU) / 2,
                             fineness.clamp(max=4) * textured], dim=1)
        return torch.cat([colour, texture], dim=1).permute(0, 2, 3, 1).contiguous().to(images.dtype)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"loader": "builtin", "arch": f"pixels-v{self.VERSION}", "pos_interp": None,
                  "note": "non-learned colour/texture descriptor; layer and norm do not apply"})
        return d
