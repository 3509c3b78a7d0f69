"""Where a call's pod may run: GPU model, count and memory, node types, tolerations.

Two steps, both pure functions:

- :func:`request_of` merges a function's options with a named node type from the
  configuration (``[tool.ascend.node_types.NAME]``) into a :class:`Request`;
- :func:`plan` turns a request into a :class:`Placement` (GPU limit, node selector, node
  affinity, tolerations, and room for a queue label and resource claims), checked
  against the cluster's nodes when the user may list them: a request that no node could
  ever satisfy raises :class:`~ascend.Unschedulable` at once, naming what exists.

GPU nodes are matched by the labels NVIDIA GPU Feature Discovery sets
(``nvidia.com/gpu.product``, ``nvidia.com/gpu.memory`` in MiB, ``nvidia.com/gpu.count``),
and product names the way people write them: ``"h100"`` matches
``NVIDIA-H100-80GB-HBM3``, ``"A100-80GB"`` matches ``NVIDIA-A100-SXM4-80GB``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ascend._config import Settings
from ascend._errors import Unschedulable
from ascend._resources import GpuChoice, Resources, memory_bytes

GPU_RESOURCE: Final = "nvidia.com/gpu"
GFD_PRODUCT: Final = "nvidia.com/gpu.product"
GFD_MEMORY: Final = "nvidia.com/gpu.memory"
GFD_COUNT: Final = "nvidia.com/gpu.count"
INSTANCE_TYPE: Final = "node.kubernetes.io/instance-type"
# The NVIDIA driver's major version (e.g. "550"); newer GFD releases also write the
# second spelling.
GFD_DRIVER_MAJOR: Final = ("nvidia.com/cuda.driver.major", "nvidia.com/cuda.driver-version.major")
GPU_TOLERATION: Final = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
_VENDOR_WORDS: Final = ("NVIDIA", "TESLA", "GEFORCE", "QUADRO", "RTX")
_MIB: Final = 1 << 20


@dataclass(frozen=True)
class Request:
    """What a call asks of its node, with any named node type already applied."""

    choices: tuple[GpuChoice, ...] = ()
    gpu_memory: int | None = None  # bytes per GPU, at least
    selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    described: str = "no GPU"

    @property
    def constrained(self) -> bool:
        """Whether anything here depends on which nodes exist (worth a pre-flight)."""
        return bool(self.choices or self.gpu_memory or self.selector)


@dataclass(frozen=True)
class Placement:
    """The pod-spec and Job parts that decide where a call runs."""

    gpu: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    affinity: Mapping[str, Any] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    """Extra Job and pod labels (a queue such as Kueue's ``kueue.x-k8s.io/queue-name``)."""
    resource_claims: tuple[Mapping[str, Any], ...] = ()
    """Pod ``resourceClaims`` (Dynamic Resource Allocation), none yet."""
    chosen: str = ""
    """What the pre-flight picked, for logs (``"NVIDIA-A100-SXM4-80GB:2"``)."""

    def apply(self, pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
        """Write this placement into a pod spec and its runner container."""
        if self.gpu:
            resources = container.setdefault("resources", {})
            resources.setdefault("limits", {})[GPU_RESOURCE] = str(self.gpu)
        if self.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in self.tolerations]
        if self.node_selector:
            pod_spec["nodeSelector"] = dict(self.node_selector)
        if self.affinity:
            pod_spec["affinity"] = {"nodeAffinity": dict(self.affinity)}
        if self.resource_claims:
            pod_spec["resourceClaims"] = [dict(c) for c in self.resource_claims]


def request_of(resources: Resources, settings: Settings) -> Request:
    """The placement a call asks for: its options, with ``node_type`` resolved.

    A ``node_type`` naming an entry of ``settings.node_types`` contributes that entry's
    GPU, GPU memory, selector and tolerations (the function's own ``gpu`` and
    ``gpu_memory`` win); any other ``node_type`` selects nodes by
    ``node.kubernetes.io/instance-type``.
    """
    gpu = resources.gpu
    gpu_memory = resources.gpu_memory
    selector: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    if resources.node_type:
        alias = settings.node_types.get(resources.node_type)
        if alias is None:
            selector[INSTANCE_TYPE] = resources.node_type
        else:
            gpu = gpu or alias.gpu
            gpu_memory = gpu_memory or alias.gpu_memory
            selector.update(alias.selector)
            tolerations.extend(alias.tolerations)
    merged = Resources(gpu=gpu, gpu_memory=gpu_memory, node_type=resources.node_type)
    choices = merged.gpu_choices
    if choices and GPU_TOLERATION not in tolerations:
        tolerations.insert(0, GPU_TOLERATION)
    return Request(
        choices=choices,
        gpu_memory=memory_bytes(gpu_memory) if gpu_memory else None,
        selector=selector,
        tolerations=tuple(tolerations),
        described=merged.describe_placement(),
    )


def product_words(name: str) -> list[str]:
    """A GPU product name as comparable words: ``"NVIDIA-A100-SXM4-80GB"`` →
    ``["A100", "SXM4", "80GB"]``; vendor and family words are dropped."""
    words = [w for w in re.split(r"[\s_\-]+", name.strip().upper()) if w]
    while words and words[0] in _VENDOR_WORDS:
        words.pop(0)
    return words


def product_matches(wanted: str, label: str) -> bool:
    """Whether a node whose ``nvidia.com/gpu.product`` is ``label`` has the GPU a user
    wrote as ``wanted``: same model word, and every other word of ``wanted`` present
    (``"A100-80GB"`` matches ``NVIDIA-A100-SXM4-80GB``, ``"L4"`` does not match
    ``NVIDIA-L40S``)."""
    want, have = product_words(wanted), product_words(label)
    if not want or not have or want[0] != have[0]:
        return False
    return all(w in have[1:] for w in want[1:])


def _spellings(product: str) -> list[str]:
    """Label values to try for ``product`` when the cluster's cannot be listed."""
    words = product_words(product)
    dashed = "-".join(words)
    out = [product, dashed, f"NVIDIA-{dashed}", f"Tesla-{dashed}"]
    return list(dict.fromkeys(out))


def _labels(node: dict[str, Any]) -> dict[str, str]:
    return dict(node.get("metadata", {}).get("labels") or {})


def _gpus(node: dict[str, Any]) -> int:
    status = node.get("status", {})
    raw = (status.get("allocatable") or {}).get(GPU_RESOURCE) or (status.get("capacity") or {}).get(
        GPU_RESOURCE
    )
    if raw is None:
        raw = _labels(node).get(GFD_COUNT, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def _gpu_memory(node: dict[str, Any]) -> int | None:
    raw = _labels(node).get(GFD_MEMORY)
    try:
        return int(raw) * _MIB if raw is not None else None
    except ValueError:
        return None


def _fits(node: dict[str, Any], choice: GpuChoice | None, request: Request) -> bool:
    """Whether the node could ever run the request (a cordoned or busy node could: it
    may come back or free up; waiting for it is unschedulable_grace's business)."""
    labels = _labels(node)
    if any(labels.get(k) != v for k, v in request.selector.items()):
        return False
    if choice is None:
        return True
    if _gpus(node) < choice.count:
        return False
    if choice.product is not None and not product_matches(
        choice.product, labels.get(GFD_PRODUCT, "")
    ):
        return False
    if request.gpu_memory is not None:
        memory = _gpu_memory(node)
        if memory is None or memory < request.gpu_memory:
            return False
    return True


def inventory(nodes: Sequence[dict[str, Any]]) -> str:
    """What GPUs (and node types) the cluster has: ``"A100-SXM4-80GB x6, L4 x12"``."""
    gpus: Counter[str] = Counter()
    types: Counter[str] = Counter()
    for node in nodes:
        labels = _labels(node)
        count = _gpus(node)
        if count:
            product = labels.get(GFD_PRODUCT)
            name = "-".join(product_words(product)) if product else "unlabelled GPU"
            memory = _gpu_memory(node)
            if memory and product and not any(w.endswith("GB") for w in product_words(product)):
                name += f" {memory // (1 << 30)}GB"
            gpus[name] += count
        if INSTANCE_TYPE in labels:
            types[labels[INSTANCE_TYPE]] += 1
    parts = [f"{name} x{n}" for name, n in sorted(gpus.items())] or ["no GPUs"]
    text = ", ".join(parts)
    if types:
        text += "; node types " + ", ".join(f"{t} x{n}" for t, n in sorted(types.items()))
    return text


def _never_satisfied(request: Request, nodes: Sequence[dict[str, Any]]) -> Unschedulable:
    wanted = " or ".join(str(c) for c in request.choices) or "its node selector"
    if request.gpu_memory:
        wanted += f" with at least {request.gpu_memory / (1 << 30):g}Gi per GPU"
    if request.selector:
        wanted += " on nodes labelled " + ",".join(f"{k}={v}" for k, v in request.selector.items())
    return Unschedulable(
        f"no node of the cluster has {wanted} ({request.described}); it has "
        f"{inventory(nodes)}. Fix: ask for hardware the cluster has, or add a fallback "
        "(gpu=['H100', 'A100']). When nodes come from an autoscaler that starts from zero, "
        "set preflight=False (ASCEND_PREFLIGHT=0) to wait for them instead."
    )


def _term(expressions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"matchExpressions": expressions}


def plan(request: Request, nodes: Sequence[dict[str, Any]] | None) -> Placement:
    """Where to run; ``nodes`` is the cluster's node list, or ``None`` if unknown.

    With ``nodes``, only choices some node could run are kept (the first that can
    decides the GPU count; later ones of the same count stay as fallbacks, preferred in
    the order given), and product names become the exact label values found. Raises
    :class:`~ascend.Unschedulable` when no node could ever run the call.
    """
    choices = list(request.choices)
    values: dict[int, list[str]] = {}  # choice position -> exact product label values
    if nodes is not None:
        if not choices and request.selector and not any(_fits(n, None, request) for n in nodes):
            raise _never_satisfied(request, nodes)
        kept = []
        for position, choice in enumerate(choices):
            fitting = [n for n in nodes if _fits(n, choice, request)]
            if fitting:
                kept.append(position)
                values[position] = sorted({_labels(n).get(GFD_PRODUCT, "") for n in fitting})
        if choices and not kept:
            raise _never_satisfied(request, nodes)
        positions = kept
    else:
        positions = list(range(len(choices)))
    if not positions:
        return Placement(node_selector=request.selector, tolerations=request.tolerations)
    count = choices[positions[0]].count
    positions = [p for p in positions if choices[p].count == count]
    terms = []
    for position in positions:
        choice = choices[position]
        expressions: list[dict[str, Any]] = []
        if choice.product is not None:
            spelled = values.get(position) or _spellings(choice.product)
            expressions.append({"key": GFD_PRODUCT, "operator": "In", "values": spelled})
        if request.gpu_memory is not None:
            mib = -(-request.gpu_memory // _MIB)
            expressions.append({"key": GFD_MEMORY, "operator": "Gt", "values": [str(mib - 1)]})
        if expressions:
            terms.append(_term(expressions))
    affinity: dict[str, Any] | None = None
    if terms:
        affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        if len(terms) > 1:
            affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
                {"weight": max(100 - 10 * i, 1), "preference": term} for i, term in enumerate(terms)
            ]
    chosen = " or ".join(
        f"{'|'.join(values.get(p) or [str(choices[p].product or 'any')])}:{count}"
        for p in positions
    )
    return Placement(
        gpu=count,
        node_selector=request.selector,
        affinity=affinity,
        tolerations=request.tolerations,
        chosen=chosen,
    )


def target_nodes(request: Request, nodes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes a GPU request could run on (any of its GPU choices); empty for a
    request that asks for no GPU."""
    return [n for n in nodes if any(_fits(n, choice, request) for choice in request.choices)]


def cuda_driver_major(node: dict[str, Any]) -> int | None:
    """The node's NVIDIA driver major version from its GPU Feature Discovery label, or
    ``None`` when it has none (no GFD, or not a GPU node)."""
    labels = _labels(node)
    for key in GFD_DRIVER_MAJOR:
        try:
            return int(labels[key])
        except (KeyError, ValueError):
            continue
    return None


def driver_major_of_targets(request: Request, nodes: Sequence[dict[str, Any]]) -> int | None:
    """The lowest driver major among the nodes the request could run on, so what is
    chosen for it runs on any of them; ``None`` when one of them is not labelled (its
    driver is unknown) or there are none."""
    majors = [cuda_driver_major(n) for n in target_nodes(request, nodes)]
    if not majors or any(m is None for m in majors):
        return None
    return min(m for m in majors if m is not None)
