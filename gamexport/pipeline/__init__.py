"""The build pipeline (``gamexport build``) and the re-check of a build folder (``gamexport parity``).

Rooms: ``options`` (what a build is asked and returns), ``folders`` (where it writes: destinations, the staging
folder and its lock), ``stages`` (the stage functions ``load → export → check → bundle → parity → latency → report →
commit`` over one ``Build`` state, and ``build``), ``latency`` (the latency stage's timing and plot) and
``recheck`` (``gamexport parity``). Runners come from ``gamexport.targets``, parity from ``gamexport.parity``.
"""

from __future__ import annotations

from gamexport.errors import GamexportError
from gamexport.sources import resolve_source, seeded_checkpoint

from .options import BuildOptions, BuildResult
from .stages import STAGES, build

__all__ = ["BuildOptions", "BuildResult", "build", "resolve_source", "seeded_checkpoint", "STAGES",
           "GamexportError"]
