"""Early layers a chunk of images at a time, late layers the whole batch at once.

On a CPU the model sees a batch a few images at a time (``CPU_FORWARD_CHUNK`` in the scheduler), so that the
tensors of its early layers, the largest of a forward pass (resnet18's first convolution: 3.2 MB an image at
224 px), are those of a few images. A late layer's tensors are a small fraction of that, and its convolutions
run faster on more images at once: on 2 cores resnet18's ``layer4`` takes 2.9 ms an image 8 at a time and 2.0 ms
32 at a time, ``layer3`` 2.1 and 1.9 ms, while its first stages run as fast either way. So where the model's
forward is, from some module on, a chain of sibling modules each taking the one before's output, the chunks run
up to that module's input, their tensors are put together, and the chain runs once on the whole batch: the
memory of a chunk and the speed of the batch where it pays.

The chain is read off the probe pass (:class:`Probe`: which modules ran, once each, in which order, with what
sizes), and starts at the first sibling from which every tensor of the whole batch stays within half the largest
tensor of a chunk. It is not taken on trust (code between the siblings, a skip connection around them, would
not show in the probe): its maps of two images are compared with the model's own forward on the same images,
and a chain that differs is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: The whole batch's tensors from the chain's start on may take at most this fraction of the largest tensor
#: of a chunk: a late layer holds a few tensors at once (a residual block's input beside its branch), the
#: layer the chunk's largest tensor comes from holds one or two.
TAIL_SHARE = 0.5
#: A chain is checked against the model's own forward on this many images of the first batch.
CHAIN_CHECK_IMAGES = 2


@dataclass
class Probe:
    """What the probe pass saw, one image: the modules in the order they completed, each one's calls, and
    per image the elements of its input and output (only for a module called with one tensor, returning one)."""

    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (input, output) elements

    def children(self, parent: str, names: Sequence[str]) -> list[str]:
        """``parent``'s direct children among ``names`` (the model's modules, in registration order)."""
        prefix = f"{parent}." if parent else ""
        return [n for n in names if n.startswith(prefix) and "." not in n[len(prefix):]]


@dataclass(frozen=True)
class Chain:
    """Sibling modules run one after the other on the whole batch, from ``modules[0]``'s input."""

    modules: tuple[str, ...]

    @property
    def start(self) -> str:
        return self.modules[0]


def within(name: str, module: str) -> bool:
    """Whether ``name`` is ``module`` or one of its descendants."""
    return name == module or name.startswith(f"{module}.")


def find_chain(probe: Probe, names: Sequence[str], layers: Sequence[str], *, batch: int, chunk: int) -> Chain | None:
    """The chain of sibling modules that can run the whole ``batch`` at once for these requested ``layers``
    (module names), or None. ``names``: every module of the model in registration order.

    A chain ends with the sibling that holds the requested module completing last; it starts at the earliest
    sibling such that every module from there (and the start's input) holds, for the whole batch, at most
    ``TAIL_SHARE`` of the largest tensor of a chunk. Each sibling ran once (a module inside may run more
    often), with one tensor in and out, in registration order; every requested layer outside the chain
    completed before it started.
    """
    if not probe.order or not layers or batch <= chunk:
        return None
    position = {name: i for i, name in enumerate(probe.order)}
    if any(layer not in position for layer in layers):
        return None
    largest = max((out for _in, out in probe.sizes.values()), default=0)
    limit = TAIL_SHARE * chunk * largest / batch  # elements per image
    last = max(layers, key=lambda layer: position[layer])
    parts = last.split(".")
    for depth in range(len(parts)):  # the root's children first: the longest chains
        parent = ".".join(parts[:depth])
        siblings = probe.children(parent, names)
        end = ".".join(parts[:depth + 1])
        if end not in siblings:
            return None
        stop = siblings.index(end)
        for first in range(stop + 1):
            chain = siblings[first:stop + 1]
            if _fits(probe, names, chain, layers, position, limit):
                return Chain(tuple(chain))
    return None


def _fits(probe: Probe, names: Sequence[str], chain: list[str], layers: Sequence[str], position: dict[str, int],
          limit: float) -> bool:
    if any(probe.calls.get(m) != 1 or m not in probe.sizes or m not in position for m in chain):
        return False
    if [position[m] for m in chain] != sorted(position[m] for m in chain):
        return False  # not run in registration order
    if probe.sizes[chain[0]][0] > limit:
        return False
    inside = [n for n in names if any(within(n, m) for m in chain)]
    if any(n in probe.sizes and probe.sizes[n][1] > limit for n in inside):
        return False
    # A requested layer outside the chain must be done before the chain starts: before its first module's
    # first descendant completed (or the module itself, when it has none that ran).
    started = min((position[n] for n in inside if n in position), default=position[chain[0]])
    return all(any(within(layer, m) for m in chain) or position[layer] < started for layer in layers)
