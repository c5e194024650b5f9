"""The bootstrap's part of the HTML report (a run with ``--bootstrap``): intervals beside the counts, and on
each unit card the interval of its IoU, how often its label holds, and a flag when its detector status
does not hold across resamples. Without a bootstrap every function here adds nothing to the page."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ...core.bootstrap import STABLE, LayerBootstrap
from ...core.types import DETECTOR_IOU

CSS = """
.card .ci, .counts .ci { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
.card .unstable { color: #b45309; font-weight: 600; }
.card.unstable { border-right: 4px solid #d97706; }
p.bootstrap { margin: 0 0 8px; color: var(--muted); }
"""


def interval(values: Sequence[int] | None) -> str:
    """`` (lo–hi)`` after a count, or nothing."""
    if values is None:
        return ""
    lo, hi = values
    return f' <span class="ci">({lo}–{hi})</span>'


def layer_note(boot: LayerBootstrap | None) -> str:
    """What the intervals are, and which units are flagged."""
    if boot is None:
        return ""
    unstable = [int(u) + 1 for u in boot.unstable.nonzero()[0]]
    flagged = (f"{len(unstable)} unit{'s' * (len(unstable) != 1)} ({', '.join(map(str, unstable[:20]))}"
               f"{', …' if len(unstable) > 20 else ''}) keep their detector status in fewer than {STABLE:.0%} of "
               "the resamples: marked “unstable detector”." if unstable else
               f"Every unit keeps its detector status in at least {STABLE:.0%} of the resamples.")
    return (f'<p class="bootstrap">Bootstrap: {boot.resamples} resamples of the images (in {boot.blocks} random '
            "blocks); counts are followed by their 95% interval, each unit by the 95% interval of its best IoU "
            f"and the share of resamples that give it the same label. {html.escape(flagged)}</p>")


def card_parts(boot: LayerBootstrap | None, unit: int) -> tuple[str, str]:
    """For unit ``unit`` (0-based): the card's extra class and the extra markup of its info line."""
    if boot is None:
        return "", ""
    lo, hi = boot.score_interval[unit]
    label, status = float(boot.label_stability[unit]), float(boot.detector_stability[unit])
    parts = (f'<span class="ci" title="95% interval of the best IoU over {boot.resamples} resamples">'
             f"[{lo:.3f}, {hi:.3f}]</span>"
             f'<span class="ci" title="share of resamples whose best concept is this label">label {label:.0%}</span>')
    if status >= STABLE:
        return "", parts
    return "unstable", parts + (f'<span class="unstable" title="detector status (IoU ≥ {DETECTOR_IOU}) as here in '
                                f'{status:.0%} of the resamples">unstable detector</span>')
