"""What the operator's files declare: the compositions and the pipelines, read together.

Read once by ``python -m client_proxy`` (so that a mistake stops the start with one line) and
again by each app worker; the pipelines may name the compositions' services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from client_proxy.config import Settings
from client_proxy.core.compositions import Composition
from client_proxy.core.compositions_file import load_compositions
from client_proxy.core.pipelines import Pipeline
from client_proxy.core.pipelines_file import configured_pipelines
from client_proxy.core.services import Service


@dataclass(frozen=True)
class Declared:
    compositions: dict[str, Composition]
    pipelines: dict[str, Pipeline]
    pipelines_source: str


def service_map(services: Iterable[Service], compositions: Iterable[Composition]) -> dict[str, Service]:
    """Every service a pipeline may name: the compositions' members, and the ``SERVICE_*``
    services, which win a name both have."""
    found = {m.service.name: m.service for c in compositions for m in c.members}
    found.update((s.name, s) for s in services)
    return found


def load_declared(
    settings: Settings, services: list[Service], environ: Mapping[str, str], warn: bool = True
) -> Declared:
    """The compositions and pipelines files, their ``${VAR}`` read from ``environ``;
    ``CompositionError`` or ``PipelineError`` naming the file and line for a mistake. ``warn``:
    log that the shipped pipelines are left out."""
    compositions = (
        load_compositions(
            settings.compositions_file, {s.name: s for s in services}, settings.protocol, environ
        )
        if settings.compositions_file is not None
        else {}
    )
    pipelines, source = configured_pipelines(
        settings.pipelines_file, service_map(services, compositions.values()), environ, warn
    )
    return Declared(compositions, pipelines, source)
