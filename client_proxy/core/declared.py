"""What the proxy serves, whole: the services, and the compositions and pipelines the operator's
files declare, read together into one ``Configuration``.

A configuration is never changed in place. A reload (``client_proxy.reloading``) or an admin
change makes a new one and puts it in place with one assignment (``ServedModels.swap``); a
request looks its model up once, and that model holds everything it calls (a composition its
members' services, a pipeline its steps'), so a request runs on the configuration it started
with, whole, while the next request gets the new one.

Read by ``python -m client_proxy`` (so that a mistake stops the start with one line), by each
app worker at start, and again at each reload; the pipelines may name the compositions' services.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from client_proxy.config import Settings
from client_proxy.core.compositions import Composition, Member
from client_proxy.core.compositions_file import CompositionError, CompositionsFile, read_compositions_file
from client_proxy.core.experiments import Experiment
from client_proxy.core.experiments_file import ExperimentSpec, bind_experiments
from client_proxy.core.pipelines import Pipeline
from client_proxy.core.pipelines_file import configured_pipelines
from client_proxy.core.services import Service

if TYPE_CHECKING:
    from client_proxy.core.served import Model

#: The admin endpoints' changes a configuration remembers (``/metadata``, the services file).
MAX_CHANGES = 100


@dataclass(frozen=True)
class Configuration:
    """The services (``SERVICE_*``, ``PROXY_SERVICES_FILE`` or the admin endpoints'), the
    compositions and the pipelines, as one value."""

    services: tuple[Service, ...]
    """The ``SERVICE_*`` services, sorted by name: the ``default`` composition's, unless the
    compositions file declares ``default``."""
    compositions: Mapping[str, Composition]
    """From ``PROXY_COMPOSITIONS_FILE`` (``default`` only if the file declares it)."""
    pipelines: Mapping[str, Pipeline]
    compositions_source: str | None = None
    pipelines_source: str = ""
    generation: int = 1
    """1 at start, one more at each change (reload or admin)."""
    changes: tuple[Mapping[str, Any], ...] = ()
    """The admin endpoints' changes to the services, newest last (``MAX_CHANGES`` at most)."""
    loaded_at: float = field(default_factory=time.time)
    """When it was made (Unix time)."""
    experiment_specs: Mapping[str, ExperimentSpec] = field(default_factory=dict)
    """The compositions file's experiments, as declared (bound to the models: ``experiments``)."""

    default: Composition = field(init=False, repr=False, compare=False)
    """The ``default`` composition: the file's, else the services with the seed's rule."""
    by_name: dict[str, Service] = field(init=False, repr=False, compare=False)
    """Every service by name: the compositions' members and the ``SERVICE_*`` services, which win
    a name both have. What a pipeline may name, and what the protocol serves as a model."""
    experiments: dict[str, Experiment] = field(init=False, repr=False, compare=False)
    """The experiments, their variants this configuration's models (``CompositionError`` when
    one names a model it does not have)."""

    def __post_init__(self) -> None:
        default = self.compositions.get("default") or Composition(
            name="default",
            description="the SERVICE_* services, each a one-vs-rest classifier: the highest P(class) wins",
            members=tuple(Member(s) for s in self.services),
            aggregator="one_vs_rest",
        )
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "by_name", service_map(self.services, self.compositions.values()))
        where = self.compositions_source

        def fail(line: int, message: str) -> CompositionError:
            return CompositionError(f"{where}: line {line}: {message}")

        object.__setattr__(self, "experiments", bind_experiments(self.experiment_specs, self.model, fail))

    def model(self, name: str) -> Model | None:
        """The composition, pipeline or service ``name`` (in that order), experiments aside."""
        if name in self.compositions:
            return self.compositions[name]
        if name == "default":
            return self.default
        return self.pipelines.get(name) or self.by_name.get(name)

    def with_services(self, services: Sequence[Service], change: Mapping[str, Any]) -> Configuration:
        """The next configuration: the same files, these ``SERVICE_*`` services (the admin
        endpoints' ``change``); the pipelines call the services now named as they name (KeyError:
        one is gone)."""
        by_name = service_map(services, self.compositions.values())
        return Configuration(
            tuple(sorted(services)),
            self.compositions,
            {name: p.bind(by_name) for name, p in self.pipelines.items()},
            self.compositions_source,
            self.pipelines_source,
            self.generation + 1,
            (*self.changes, change)[-MAX_CHANGES:],
            experiment_specs=self.experiment_specs,
        )

    def every_service(self) -> list[Service]:
        """Every service some model of it calls, each once (the clients to open): ``by_name``
        (the ``SERVICE_*`` services, and what the pipelines are bound to) and the compositions'
        members, one of which a ``SERVICE_*`` service of the same name hides from ``by_name``."""
        found = {id(s): s for s in self.by_name.values()}
        for composition in self.compositions.values():
            found.update((id(s), s) for s in composition.services)
        for experiment in self.experiments.values():
            found.update((id(v.model), v.model) for v in experiment.variants if isinstance(v.model, Service))
        return list(found.values())

    def describe(self) -> dict[str, object]:
        """What ``/metadata`` and ``/admin/reload`` show of it."""
        return {
            "generation": self.generation,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "compositions_file": self.compositions_source,
            "pipelines_file": self.pipelines_source,
            "services": [s.name for s in self.services],
            "compositions": sorted(self.compositions),
            "pipelines": sorted(self.pipelines),
            "experiments": sorted(self.experiments),
        }


def service_map(services: Iterable[Service], compositions: Iterable[Composition]) -> dict[str, Service]:
    """Every service a pipeline may name: the compositions' members, and the ``SERVICE_*``
    services, which win a name both have."""
    found = {m.service.name: m.service for c in compositions for m in c.members}
    found.update((s.name, s) for s in services)
    return found


def load_configuration(
    settings: Settings,
    services: Sequence[Service],
    environ: Mapping[str, str],
    warn: bool = True,
    generation: int = 1,
    changes: Sequence[Mapping[str, Any]] = (),
) -> Configuration:
    """The compositions and pipelines files over ``services``, their ``${VAR}`` read from
    ``environ``; ``CompositionError`` or ``PipelineError`` naming the file and line for a mistake.
    ``warn``: log that the shipped pipelines are left out."""
    declared = (
        read_compositions_file(
            settings.compositions_file, {s.name: s for s in services}, settings.protocol, environ
        )
        if settings.compositions_file is not None
        else CompositionsFile({}, {})
    )
    compositions = declared.compositions
    pipelines, source = configured_pipelines(
        settings.pipelines_file, service_map(services, compositions.values()), environ, warn
    )
    return Configuration(
        tuple(sorted(services)),
        compositions,
        pipelines,
        str(settings.compositions_file) if settings.compositions_file is not None else None,
        source,
        generation,
        tuple(changes)[-MAX_CHANGES:],
        experiment_specs=declared.experiments,
    )
