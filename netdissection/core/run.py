"""One dissection, end to end: resolve the components, run the passes, write the reports."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .errors import DissectionError, UnknownNameError
from .protocols import Backend, ConceptDataset
from .reporting import write_reports
from .scheduler import LITE_INPUT, Plan, Progress, run_passes
from .types import BackendOptions, InputSpec, LayerInfo, RunResult

log = logging.getLogger(__name__)

COMPAT_MODES = ("paper", "lite")


def resolve_backend(host: Any, model: Any, backend: str | None) -> str:
    """The backend named by the user, else the first plugin that claims the model reference."""
    catalog = host.catalog("backend")
    if backend is not None:
        catalog.get(backend)  # unknown names fail here with close matches
        return backend
    detected = host.hook.dissect_detect_backend(model_ref=model)
    if detected is not None:
        return str(detected)
    if isinstance(model, str) and (model.endswith(("/", "\\")) or Path(model).suffix):
        if not Path(model).exists():
            raise DissectionError(f"model file {model} does not exist")
        raise DissectionError(f"no backend loads {model}; pass --backend NAME (see: dissect plugins)")
    # A bare name nobody claims: close matches from every name-based backend (those registered with
    # ``names=``, a callable listing the names they take), or the name's owner if it did not detect it.
    known: list[str] = []
    for entry in catalog:
        names = entry.metadata.get("names")
        if names is None or not isinstance(model, str):
            continue
        try:
            listed = list(names())
        except DissectionError:  # a backend whose framework is not installed
            continue
        if model in listed:
            return entry.name
        known.extend(listed)
    if known:
        raise UnknownNameError("model", str(model), dict.fromkeys(known),
                               hint="list the backends with: dissect backends")
    raise DissectionError(f"no backend takes the model {model!r}; pass --backend NAME (see: dissect backends)")


def make_backend(host: Any, model: Any, backend: str | None, options: BackendOptions) -> tuple[str, Backend]:
    name = resolve_backend(host, model, backend)
    return name, host.catalog("backend").get(name).factory(model, options)


def resolve_dataset(host: Any, dataset: Any, dataset_format: str | None,
                    categories: Sequence[str] | None, options: dict[str, Any] | None = None) -> ConceptDataset:
    """A concept dataset object from a path (format detected or named), or the built-in default set."""
    catalog = host.catalog("dataset")
    options = options or {}
    if dataset is None:
        return catalog.get("builtin").factory(None, categories=categories, **options)
    if not isinstance(dataset, str | Path):
        return dataset  # already a dataset object (Python API)
    if dataset_format is not None:
        return catalog.get(dataset_format).factory(dataset, categories=categories, **options)
    for entry in catalog:
        detect = entry.metadata.get("detect")
        if detect is not None and detect(dataset):
            return entry.factory(dataset, categories=categories, **options)
    path = Path(str(dataset)).expanduser()
    if not path.exists():
        raise DissectionError(f"dataset folder {path} does not exist; pass --dataset with a concept dataset "
                              "folder (or leave it out to use the built-in concept set)")
    raise DissectionError(f"cannot tell the format of the dataset {path}; pass --dataset-format "
                          f"({', '.join(catalog.names())})")


def check_layers(infos: list[LayerInfo], requested: Sequence[str] | None, model_name: str) -> list[str]:
    """The requested layers, checked; with none, the last layer with a spatial map."""
    by_name = {i.name: i for i in infos}
    if not requested:
        spatial = [i for i in infos if i.spatial]
        if not spatial:
            raise DissectionError(f"{model_name} has no layer with a spatial map to dissect")
        return [spatial[-1].name]
    layers = []
    for name in requested:
        info = by_name.get(name)
        if info is None:
            raise UnknownNameError(f"layer of {model_name}", name, list(by_name),
                                   hint=f"list them with: dissect layers {model_name}")
        if not info.spatial:
            raise DissectionError(f"layer {name!r} of {model_name} has no spatial map (output shape "
                                  f"{tuple(info.shape)}); pick a layer listed as conv or tokens by "
                                  f"'dissect layers {model_name}'")
        if name not in layers:
            layers.append(name)
    return layers


def dissect(
    model: Any,
    *,
    backend: str | None = None,
    dataset: Any = None,
    dataset_format: str | None = None,
    layers: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    quantile: float = 0.005,
    compat: str = "paper",
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    top_k: int = 10,
    reporters: Sequence[str] | None = None,
    skip_bad: bool = False,
    progress: Progress | None = None,
    host: Any = None,
    backend_options: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
) -> RunResult:
    """Dissect ``model`` on a concept dataset; write the reports to ``out`` (if given) and return the results.

    ``model`` is a name or path a backend accepts, or a ``torch.nn.Module``. ``dataset`` is a path, a
    dataset object, or None for the built-in generated concept set.
    """
    from ..registry import build_host
    from .loading import default_workers

    if compat not in COMPAT_MODES:
        raise DissectionError(f"--compat must be one of {', '.join(COMPAT_MODES)}, not {compat!r}")
    if not 0 < quantile < 1:
        raise DissectionError(f"--quantile must be between 0 and 1, not {quantile}")
    if batch_size < 1:
        raise DissectionError(f"--batch-size must be at least 1, not {batch_size}")
    _check_device(device)
    host = host or build_host()
    options = BackendOptions(weights=weights, device=device, pretrained=pretrained, **(backend_options or {}))
    backend_name, model_backend = make_backend(host, model, backend, options)
    description = model_backend.describe()
    model_name = str(description.get("model", model))
    select = getattr(model_backend, "select_layers", None)  # a backend may choose its default and explain refusals
    layer_names = select(layers) if select is not None else check_layers(model_backend.layers(), layers, model_name)
    resolved = {i.name: i.module or i.name for i in model_backend.layers()}  # stage:-1 → stages.3
    concept_set = resolve_dataset(host, dataset, dataset_format, categories, dataset_options)

    spec = model_backend.input_spec()
    if compat == "lite":
        spec = InputSpec(size=spec.size, mean=LITE_INPUT.mean, std=LITE_INPUT.std, channel_order=spec.channel_order)
    rule_entry = host.catalog("threshold").get("quantile")

    def make_rule(units: int, values: int) -> Any:
        return rule_entry.factory(units, values, q=quantile, compat=compat, device=device)

    provenance: dict[str, Any] = {
        "netdissection": __version__,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "backend": backend_name,
        "backend_details": description,
        "dataset": concept_set.describe(),
        "layers": layer_names,
        "threshold_rule": {"name": "quantile", "q": quantile, "compat": compat},
        "semantics": compat,
        "input": {"mean": list(spec.mean), "std": list(spec.std), "channel_order": spec.channel_order},
        "device": device,
        "batch_size": batch_size,
        "plugins": host.plugin_versions(),
        "python": platform.python_version(),
    }
    host.hook.dissect_run_start(run=provenance)
    for name in layer_names:
        host.hook.dissect_layer_start(run=provenance, layer=name)
    plan = Plan(backend=model_backend, dataset=concept_set, layers=layer_names, make_rule=make_rule,
                semantics=compat, batch_size=batch_size,
                workers=default_workers() if workers is None else workers, device=device, top_k=top_k,
                skip_bad=skip_bad, work_dir=Path(out) if out is not None else None)
    started = time.perf_counter()
    try:
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
        layer_results, images, seconds = run_passes(plan, spec, progress)
        for layer_result in layer_results.values():
            layer_result.seconds = dict(seconds)
            layer_result.module = resolved.get(layer_result.layer, layer_result.layer)
            host.hook.dissect_layer_finish(run=provenance, result=layer_result)
        seconds["passes"] = time.perf_counter() - started
        result = RunResult(layers=layer_results, provenance=provenance, seconds=seconds, images=images,
                           dataset=concept_set)
        if out is not None:
            started = time.perf_counter()
            write_reports(host, result, Path(out), reporters)
            seconds["reports"] = time.perf_counter() - started
    except BaseException as exc:
        host.hook.dissect_run_error(run=provenance, error=exc)
        raise
    host.hook.dissect_run_finish(run=provenance, result=result)
    return result


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DissectionError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return
    raise DissectionError(f"--device must be cpu or cuda[:N], not {device!r}")
