"""Basis rotation: dissect a layer's units in a randomly rotated basis (the paper's "interpretability is not
discriminative power").

At every position the layer's activation vector a(x) ∈ R^U becomes Q^α a(x). Q is a random rotation,
Haar-distributed on SO(U); Q^α is its fractional power: Q's real Schur form Q = Z T Zᵀ is block diagonal
(Q is normal) with 2×2 blocks that rotate a plane by an angle θ and 1×1 blocks ±1; Q^α = Z T^α Zᵀ turns
each plane by αθ instead (a pair of −1 entries is a plane turned by π). So Q^α is a real orthogonal
matrix for every α in [0, 1], Q^0 = I exactly and Q^1 = Q exactly. A network whose next linear layer
takes W Q^{-α} for W computes the same function on the rotated units: only the basis the units are read in
changes, which is what the paper's experiment shows moves the detectors.

Why not ``scipy.linalg.fractional_matrix_power``: it goes through the complex Schur form and a Padé
approximation, returns complex matrices where Q has eigenvalue −1, and is orthogonal only to its
approximation error; the real Schur form gives the exact rotation angles.

Every rotated layer gets its own Q, drawn from the seed and the layer's module name (a numpy
``SeedSequence`` of both), so a layer's Q does not depend on which other layers a run dissects. Q is the
QR factor of a standard Gaussian matrix with the signs of R's diagonal moved into Q (Haar on O(U)), its
first column negated when its determinant is −1 (Haar on SO(U)).

The rotation is a layer transform (``scheduler.Plan.transforms``): it acts on the backend's maps before the
threshold rule, the top images, the activation cache and the IoU pass see them, so every backend gets it.
The matrix is applied in float32, the maps' own precision; an exact identity (α = 0) leaves the maps as
they are. Building it costs O(U³) in float64 — the Schur form, needed for 0 < α < 1, is most of it (about
2 s at 512 units and a minute at 2,048 on two cores) — once per layer, seed and process whatever the α. It needs
:data:`MATRICES` U×U float64 matrices at once (the Gaussian draw, Q, its Schur form T and basis Z, Q^α):
layers above :data:`MAX_ROTATION_UNITS` units (2.5 GiB of them) are refused before any pass runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DissectionError

if TYPE_CHECKING:  # pragma: no cover - torch loads only with a run
    import torch

    from .types import LayerInfo

log = logging.getLogger(__name__)

#: U×U float64 matrices held at once while a rotation is built.
MATRICES = 5
#: The widest layer rotated: 5 × 8192² × 8 bytes = 2.5 GiB of matrices (and an hour or so of Schur form on
#: two cores); wider layers are refused in one line.
MAX_ROTATION_UNITS = 8192
#: Bump when the Q or Q^α drawn for a seed would change (it is in the job key).
ROTATION_METHOD = "haar-qr+real-schur/1"


@dataclass(frozen=True)
class Rotation:
    """A run's rotation: every dissected layer's units read in the basis Q^alpha, Q drawn from ``seed``."""

    alpha: float
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """What a job key records of it."""
        return {"alpha": float(self.alpha), "seed": int(self.seed), "method": ROTATION_METHOD}


def check_rotation(alpha: float | None, seed: int | None = 0) -> Rotation | None:
    """``--rotate ALPHA`` and ``--rotate-seed S`` checked before anything is built (None: no rotation)."""
    if alpha is None:
        if seed not in (None, 0):
            raise DissectionError(f"--rotate-seed {seed} picks the rotation of --rotate ALPHA; pass --rotate too")
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise DissectionError(f"--rotate takes a number α between 0 and 1, not {alpha!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise DissectionError(f"--rotate {alpha}: α must be between 0 (no rotation) and 1 (the full random "
                              "rotation Q)")
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DissectionError(f"--rotate-seed takes a whole number ≥ 0, not {seed!r}")
    _scipy()
    return Rotation(alpha=value, seed=int(seed))


def check_units(layer: str, units: int) -> None:
    """A layer too wide to rotate in memory is refused, with the limit and what it costs."""
    if units > MAX_ROTATION_UNITS:
        need = MATRICES * units * units * 8
        raise DissectionError(
            f"--rotate: layer {layer!r} has {units} units; rotating it needs {MATRICES} {units}×{units} float64 "
            f"matrices ({need / 2**30:.1f} GiB) and a Schur form of that size: at most {MAX_ROTATION_UNITS} units "
            "can be rotated; pick a narrower layer")


def _scipy() -> Any:
    try:
        import scipy.linalg
    except ImportError:
        raise DissectionError("--rotate needs scipy (its real Schur form); install it with: "
                              "pip install 'netdissection[rotate]'") from None
    return scipy.linalg


# ---- the matrices ------------------------------------------------------------------------------------------

def seed_sequence(seed: int, layer: str) -> list[int]:
    """The entropy of a layer's Q: the seed and 64 bits of the SHA-256 of the layer's module name."""
    return [int(seed), int.from_bytes(hashlib.sha256(layer.encode("utf-8")).digest()[:8], "little")]


def haar_rotation(units: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random rotation of R^units (float64, determinant +1)."""
    gaussian = rng.standard_normal((units, units))
    q, r = np.linalg.qr(gaussian)
    # Moving the signs of R's diagonal into Q makes Q Haar on O(U) (a bare QR factor is not).
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # a fixed reflection maps the other coset of O(U) onto SO(U), keeping Haar measure
    return q


@dataclass(frozen=True)
class Planes:
    """Q = Z R Zᵀ with R block diagonal: ``pairs[k] = (i, j)`` columns of Z turned by ``angles[k]`` (from
    column i towards column j); every other column of Z is fixed."""

    basis: np.ndarray
    pairs: np.ndarray  # (P, 2) int
    angles: np.ndarray  # (P,) float64, in (-π, π]


def rotation_planes(q: np.ndarray) -> Planes:
    """The planes and angles of a rotation from its real Schur form."""
    linalg = _scipy()
    t, z = linalg.schur(q, output="real")
    units = len(t)
    pairs, angles, flipped = [], [], []
    i = 0
    while i < units:
        if i + 1 < units and t[i + 1, i] != 0.0:  # LAPACK leaves exact zeros below 1×1 blocks
            a, b, c, d = t[i, i], t[i, i + 1], t[i + 1, i], t[i + 1, i + 1]
            # Q z_i = a z_i + c z_{i+1}: a turn by θ from z_i towards z_{i+1} (b = −c, a = d up to rounding).
            pairs.append((i, i + 1))
            angles.append(math.atan2((c - b) / 2, (a + d) / 2))
            i += 2
        else:
            if t[i, i] < 0:
                flipped.append(i)
            i += 1
    if len(flipped) % 2:
        raise ValueError("the matrix is not a rotation (its determinant is −1)")
    # Two −1 eigenvalues make a plane turned by π.
    for k in range(0, len(flipped), 2):
        pairs.append((flipped[k], flipped[k + 1]))
        angles.append(math.pi)
    return Planes(z, np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(angles, dtype=np.float64))


def planes_power(planes: Planes, alpha: float) -> np.ndarray:
    """Z R^α Zᵀ: every plane turned by α times its angle (float64)."""
    z = planes.basis
    turned = z.copy()  # Z R^α, column pairs mixed in place: O(U²), not a U³ product with R^α
    i, j = planes.pairs[:, 0], planes.pairs[:, 1]
    cos, sin = np.cos(alpha * planes.angles), np.sin(alpha * planes.angles)
    turned[:, i] = z[:, i] * cos + z[:, j] * sin
    turned[:, j] = z[:, j] * cos - z[:, i] * sin
    return turned @ z.T


def fractional_rotation(q: np.ndarray, alpha: float, planes: Planes | None = None) -> np.ndarray:
    """Q^α for a rotation Q and α in [0, 1] (float64): I exactly at α = 0, Q exactly at α = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    if alpha == 0.0:
        return np.eye(len(q))
    if alpha == 1.0:
        return q.copy()
    return planes_power(planes if planes is not None else rotation_planes(q), alpha)


@functools.lru_cache(maxsize=2)
def _layer_q(units: int, entropy: tuple[int, ...]) -> np.ndarray:
    return haar_rotation(units, np.random.default_rng(np.random.SeedSequence(list(entropy))))


@functools.lru_cache(maxsize=2)
def _layer_planes(units: int, entropy: tuple[int, ...]) -> Planes:
    """A layer's Q in planes, kept for the next α of the same layer and seed (one Schur form for a whole
    ``--rotate 0,0.2,...,1`` comparison)."""
    return rotation_planes(_layer_q(units, entropy))


def layer_matrix(rotation: Rotation, layer: str, units: int) -> np.ndarray:
    """The layer's Q^α (float64), Q drawn from the rotation's seed and the layer's module name. Only a
    fractional α needs the Schur form."""
    check_units(layer, units)
    if rotation.alpha == 0.0:
        return np.eye(units)
    entropy = tuple(seed_sequence(rotation.seed, layer))
    if rotation.alpha == 1.0:
        return _layer_q(units, entropy).copy()
    return planes_power(_layer_planes(units, entropy), rotation.alpha)


# ---- the transform -------------------------------------------------------------------------------------------

class RotationTransform:
    """``(N, U, h, w) → (N, U, h, w)``: a(x) ↦ M a(x) at every position, in float32 (a plan's layer transform).

    Holds the matrix as numpy (so a plan pickles to worker processes) and a tensor per device."""

    def __init__(self, layer: str, matrix: np.ndarray) -> None:
        self.layer = layer
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.identity = bool(np.array_equal(self.matrix, np.eye(len(self.matrix), dtype=np.float32)))
        self._tensors: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tensors": {}}

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        import torch

        units = len(self.matrix)
        if maps.shape[1] != units:
            raise DissectionError(f"--rotate: layer {self.layer!r} gives {maps.shape[1]} units, its rotation was "
                                  f"drawn for {units}")
        if self.identity:
            return maps
        device = str(maps.device)
        if device not in self._tensors:
            self._tensors[device] = torch.from_numpy(self.matrix).to(maps.device)
        return torch.einsum("ij,njhw->nihw", self._tensors[device], maps.float()).contiguous()


def rotation_transforms(rotation: Rotation, infos: Sequence[LayerInfo], layers: Sequence[str],
                        modules: Mapping[str, str]) -> tuple[dict[str, RotationTransform], dict[str, Any]]:
    """Each dissected layer's transform, and what provenance records: α, the seed, and per layer its
    module, units, the seed sequence its Q comes from, and the SHA-256 of the float32 Q^α applied."""
    by_name = {info.name: info for info in infos}
    for name in layers:  # every width checked before any matrix is built
        info = by_name.get(name)
        if info is None or len(info.shape) < 1:
            raise DissectionError(f"--rotate: the backend does not say how many units layer {name!r} has")
        check_units(name, int(info.units))
    transforms: dict[str, RotationTransform] = {}
    recorded: dict[str, Any] = {}
    for name in layers:
        module = modules.get(name, name)
        units = int(by_name[name].units)
        transform = RotationTransform(name, layer_matrix(rotation, module, units))
        transforms[name] = transform
        recorded[name] = {"module": module, "units": units, "seed_sequence": seed_sequence(rotation.seed, module),
                          "matrix_sha256": hashlib.sha256(transform.matrix.tobytes()).hexdigest()}
    provenance = {**rotation.key(), "layers": recorded,
                  "what": "each layer's units read as Q^alpha a(x), Q Haar-random on SO(units) from the seed and "
                          "the layer's module name"}
    return transforms, provenance
