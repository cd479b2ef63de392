"""Frozen, validated specs and their YAML form: pruning plans.

A pruning **plan** maps component selectors (see :mod:`asrprune.components`) to sparsities.

Command-line form (``--plan``)::

    decoder.self_attn=0.5,encoder.layers[-4:]=0.5
    decoder.ffn=0.3@matrix            # scope per entry: @component (default) or @matrix
    decoder.ffn=2:4                   # N:M semi-structured pattern (sparsity 1 - N/M)
    encoder.ffn=0.3@neurons           # structured: 30% of each selected layer's FFN neurons removed
    decoder.self_attn=0.25@heads      # structured: round(0.25 * heads) heads of each attention removed
    decoder.layers[1:-1]=drop         # structured: these layers removed (0.5@layers: half of them, by score)

- Entries are separated by ``,`` or ``;`` or newlines. A ``,`` inside ``[...]``, ``(...)`` or
  ``{...}`` does not separate (so ``layers[0,2]`` and ``re:fc[12]{1,2}`` work). When an entry
  itself needs a top-level comma, separate the entries with ``;``: if the text contains a ``;``,
  only ``;`` and newlines separate.
- Each entry is ``SELECTOR=VALUE[@SCOPE]``, split at the *last* ``=`` (regexes may contain
  ``=``). ``VALUE`` is a fraction in [0, 1] (``0.5``, never ``50``/``50%``) or an ``N:M`` pattern.

YAML form (unknown keys are errors)::

    mode: per_entry          # or: global
    score: magnitude
    name: paper-40.8         # optional label
    entries:
      - {selector: decoder.self_attn, sparsity: 0.5}
      - {selector: late_encoder, sparsity: 0.5, scope: matrix}
      - {selector: decoder.ffn, pattern: "2:4"}

Scopes:

- ``component`` (default): one magnitude threshold pooled over all parameters the entry
  selects: the paper's tau(rho, c), ``torch.nn.utils.prune.global_unstructured``.
- ``matrix``: every selected tensor is pruned to the entry's sparsity on its own
  (``l1_unstructured`` per matrix).
- plan ``mode: global``: one threshold pooled over the parameters of *every* entry; valid only
  when all entries share one sparsity and none has a pattern ("global magnitude 40%"); the
  entries' scopes are then ignored. A single ``all_linear=0.4`` entry of scope ``component`` is
  the same pooled threshold.
- ``pattern: "N:M"``: keep N of every M consecutive weights along the input dimension of each
  matrix; the entry's scope does not apply (the pattern is per row group by construction).

Units (``unit``, default ``weights``): ``neurons``, ``heads`` and ``layers`` remove whole
structures (:mod:`asrprune.structured`): the matrices get smaller. They share the ``@`` slot with
the scopes (an entry has a scope or a unit, never both), take no N:M pattern, and are ranked by
the plan's score: ``magnitude`` (the norm of the unit's weights), ``wanda`` (activation-aware:
the unit's output energy on calibration data), ``fluctuation`` (FLAP's variance of the unit's
output) or ``loss`` (the calibration loss with the unit removed). ``to_dict()`` writes ``unit``
only when it is not ``weights`` (older plans keep their form).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = [
    "CALIBRATED_SCORES",
    "DIAGNOSTICS",
    "DTYPES",
    "MODES",
    "PROTOCOLS",
    "PlanEntry",
    "PlanError",
    "PrunePlan",
    "SCOPES",
    "SCORES",
    "UNITS",
    "UNIT_SCORES",
    "check_dtype",
    "check_keys",
    "load_yaml",
    "check_nm",
    "check_sparsity",
    "parse_nm",
    "score_scopes",
]

# -- the shared vocabulary (one home each) ------------------------------------------------------
#: decoding protocols (see asrprune.decoding): the Open ASR leaderboard's way, the paper's way
PROTOCOLS = ("standard", "paper")
#: model dtypes by their canonical names, and the aliases accepted for them
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
#: how an entry's threshold is formed (see the module docstring)
SCOPES = ("component", "matrix", "row")
#: how a plan's entries share thresholds; the first is the default
MODES = ("per_entry", "global")
DEFAULT_MODE = MODES[0]
#: per-weight scores a plan may name
SCORES = ("magnitude", "taylor", "obd", "fisher", "gradient", "wanda", "sparsegpt", "random", "custom",
          "fluctuation", "loss")
#: what an entry removes: single weights (masks), or whole structures (smaller matrices)
UNITS = ("weights", "neurons", "heads", "layers")
#: how structured units can be ranked (magnitude: weight norm; wanda: output energy)
UNIT_SCORES = ("magnitude", "wanda", "fluctuation", "loss")
#: scores that rank only structured units
STRUCTURED_ONLY_SCORES = ("fluctuation", "loss")
#: what structured pruning may do after removing units (asrprune.structured)
REPAIRS = ("none", "bias", "refit")
#: the pruning methods that need a calibration pass (activations of the model being pruned)
CALIBRATED_SCORES = ("wanda", "sparsegpt")
#: which groupings (scopes) each score supports; the first is the default of an entry without one
SCORE_SCOPES = {
    "wanda": ("row", "matrix"),  # |W| * ||X|| compared within each output row (the Wanda paper)
    "sparsegpt": ("matrix",),  # picks its mask per 128-column block, per matrix
}
_PER_WEIGHT_SCOPES = ("component", "matrix", "row")  # magnitude and precomputed per-weight scores


def score_scopes(score: str) -> tuple[str, ...]:
    """The groupings a score supports, its default first."""
    return SCORE_SCOPES.get(score, _PER_WEIGHT_SCOPES)
#: per-parameter sensitivity diagnostics (see asrprune.sensitivity)
DIAGNOSTICS = ("gradient", "taylor", "fisher", "obd")


class PlanError(ValueError):
    """A pruning plan (CLI text, YAML file or constructor arguments) is invalid."""


def check_sparsity(
    value: Any, what: str = "sparsity", *, positive: bool = False, error: type[Exception] = PlanError
) -> float:
    """The one sparsity validator: a real number in [0, 1] (``(0, 1]`` with ``positive``).

    Args:
        value: the candidate (percentages such as 50 are refused with a hint).
        what: how the value is named in the message (``"plan entry 'x': sparsity"``).
        positive: refuse 0 as well (levels of sweeps and ablations).
        error: the exception class to raise (a ``ValueError`` subclass, or argparse's
            ``ArgumentTypeError`` for flags).

    Returns:
        ``float(value)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number in [0, 1], got {value!r}")
    v = float(value)
    low_ok = v > 0.0 if positive else v >= 0.0
    if not math.isfinite(v) or not low_ok or v > 1.0:
        hint = " (sparsities are fractions: write 0.5 for 50%)" if 1.0 < v <= 100.0 else ""
        interval = "(0, 1]" if positive else "[0, 1]"
        raise error(f"{what} must be in {interval}, got {value!r}{hint}")
    return v


def check_nm(n: Any, m: Any, what: str = "N:M pattern", *, error: type[Exception] = PlanError) -> tuple[int, int]:
    """The one N:M validator: integers with ``1 <= N < M`` (N counts the *kept* weights)."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise error(f"{what} needs integers N and M, got {n!r}:{m!r}")
    if not 1 <= n < m:
        raise error(f"{what} {n}:{m} needs 1 <= N < M, e.g. '2:4' or '4:8' (N weights kept of every M)")
    return n, m


def parse_nm(pattern: Any, what: str = "N:M pattern", *, error: type[Exception] = PlanError) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``: keep N of every M consecutive weights.

    Raises:
        ``error``: the text is not ``N:M``, or not ``1 <= N < M``.
    """
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise error(f"{what} must look like '2:4' (keep N of every M), got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise error(f"{what} {pattern!r} needs 1 <= N < M, e.g. '2:4' or '4:8'")
    return n, mm


def check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str, *,
               error: type[Exception] = PlanError) -> None:
    """Unknown keys are errors (a YAML spec is a serialised spec): name them and what is allowed."""
    unknown = sorted(map(str, set(obj) - set(allowed)))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")


def load_yaml(path: str | os.PathLike, what: str, *, error: type[Exception] = PlanError) -> Any:
    """The content of a YAML file (``{}`` for an empty one).

    Raises:
        FileNotFoundError: the file does not exist (named, with ``what`` it should hold).
        ``error``: not valid YAML, naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {exc}") from None
    return {} if data is None else data


def check_dtype(name: Any, what: str = "dtype") -> str:
    """The canonical dtype name (``float32``, ``float16``, ``bfloat16``) of a name or alias."""
    text = str(name).removeprefix("torch.")
    text = DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return text


@dataclass(frozen=True, eq=False)
class PlanEntry:
    """One line of a plan: prune what ``selector`` names to ``sparsity``.

    Attributes:
        selector: a selector of :mod:`asrprune.components` (``"decoder.self_attn"``).
        sparsity: fraction in [0, 1] to zero. With a ``pattern`` it may be ``None`` and is then
            set to ``1 - N/M``; a given value must equal that.
        scope: ``"component"`` (one threshold pooled over the selection), ``"matrix"`` (each
            tensor on its own) or ``"row"`` (each output row of each matrix on its own); ``None``
            (not given) takes the plan method's default grouping (component for magnitude, row
            for Wanda, matrix for SparseGPT).
        pattern: ``"N:M"`` semi-structured pattern or ``None``.
        unit: ``"weights"`` (default), ``"neurons"``, ``"heads"`` or ``"layers"`` (module
            docstring); a structured unit has no scope and no pattern; neurons and heads take a
            sparsity below 1 (a layer keeps at least one), layers up to 1 (``drop``).

    Raises:
        PlanError (ValueError): on any invalid field, naming the field and the allowed values.
    """

    selector: str
    sparsity: float  # ``None`` is accepted with a pattern and replaced by 1 - N/M
    scope: str | None = None
    pattern: str | None = None
    unit: str = "weights"

    def __post_init__(self) -> None:
        if not isinstance(self.selector, str) or not self.selector.strip():
            raise PlanError(f"plan entry selector must be a non-empty string, got {self.selector!r}")
        object.__setattr__(self, "selector", self.selector.strip())
        what = f"plan entry {self.selector!r}"
        if self.unit not in UNITS:
            raise PlanError(f"{what}: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.unit != "weights":
            if self.scope is not None:
                raise PlanError(f"{what}: @{self.unit} and the scope {self.scope!r} share the '@' slot; "
                                "a structured unit has no scope")
            if self.pattern is not None:
                raise PlanError(f"{what}: unit {self.unit} removes whole {self.unit}; it takes a fraction, "
                                f"not the pattern {self.pattern}")
            s = check_sparsity(self.sparsity, f"{what}: sparsity")
            if s <= 0:
                raise PlanError(f"{what}: removing 0 {self.unit} is no entry; give a fraction above 0")
            if self.unit in ("neurons", "heads") and s >= 1:
                raise PlanError(f"{what}: removing every {self.unit[:-1]} of a layer leaves nothing to compute; "
                                f"give a fraction below 1 (to remove the layers, write {self.selector}=drop)")
            object.__setattr__(self, "sparsity", s)
            return
        if self.scope is not None and self.scope not in SCOPES:
            raise PlanError(f"{what}: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.pattern is not None:
            n, m = parse_nm(self.pattern, f"{what}: pattern")
            object.__setattr__(self, "pattern", f"{n}:{m}")
            implied = 1.0 - n / m
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            else:
                s = check_sparsity(self.sparsity, f"{what}: sparsity")
                if abs(s - implied) > 1e-9:
                    raise PlanError(
                        f"{what}: sparsity {self.sparsity} contradicts pattern {n}:{m}, which "
                        f"prunes exactly {implied:g}; give only the pattern"
                    )
                object.__setattr__(self, "sparsity", implied)
        else:
            if self.sparsity is None:
                raise PlanError(f"{what}: sparsity is missing (or give a pattern such as '2:4')")
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, f"{what}: sparsity"))

    def _key(self) -> tuple:
        # an entry written without a scope equals the same entry with the default one
        return (self.selector, self.sparsity, (self.scope or "component") if self.unit == "weights" else None,
                self.pattern, self.unit)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanEntry) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of the pattern, or ``None``."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def structured(self) -> bool:
        """Whether the entry removes whole structures (neurons, heads, layers)."""
        return self.unit != "weights"

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form; ``pattern`` only when set, ``unit`` only when not ``weights``."""
        if self.structured:
            return {"selector": self.selector, "sparsity": self.sparsity, "unit": self.unit}
        d: dict[str, Any] = {"selector": self.selector, "sparsity": self.sparsity, "scope": self.scope or "component"}
        if self.pattern is not None:
            d["pattern"] = self.pattern
        return d

    def to_text(self) -> str:
        """The CLI form: ``selector=0.5``, ``selector=0.5@matrix``, ``selector=2:4``,
        ``selector=0.3@neurons`` or ``selector=drop``."""
        if self.unit == "layers" and self.sparsity == 1.0:
            return f"{self.selector}=drop"
        if self.structured:
            return f"{self.selector}={self.sparsity:g}@{self.unit}" if _short_ok(self.sparsity) else (
                f"{self.selector}={self.sparsity!r}@{self.unit}")
        if self.pattern is not None:
            return f"{self.selector}={self.pattern}"
        scope = "" if self.scope in (None, "component") else f"@{self.scope}"
        return f"{self.selector}={self.sparsity:g}{scope}" if _short_ok(self.sparsity) else (
            f"{self.selector}={self.sparsity!r}{scope}"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "plan entry") -> "PlanEntry":
        """Build from a mapping with keys selector, sparsity, scope, pattern.

        Raises:
            PlanError: unknown or missing keys, invalid values.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{where} must be a mapping with a selector and a sparsity, got {data!r}")
        allowed = {"selector", "sparsity", "scope", "pattern", "unit"}
        check_keys(data, allowed, where)
        if "selector" not in data:
            raise PlanError(f"{where}: 'selector' is missing")
        pattern = data.get("pattern")
        unit = str(data.get("unit") or "weights")
        sparsity = data.get("sparsity")
        if sparsity == "drop":
            sparsity, unit = 1.0, "layers"
        return cls(
            selector=data["selector"],
            sparsity=sparsity,
            scope=data.get("scope"),
            pattern=None if pattern is None else str(pattern),
            unit=unit,
        )


def _short_ok(x: float | None) -> bool:
    return x is not None and float(f"{x:g}") == x


def split_top_level(text: str, seps: str, *, always: str = "", opening: str = "[({", closing: str = "])}") -> list[str]:
    """Split ``text`` at the characters of ``seps`` that stand outside brackets (those of
    ``always`` split inside brackets too). Used for plan entries and selector paths."""
    out, cur, depth = [], [], 0
    for ch in text:
        if ch in opening:
            depth += 1
        elif ch in closing:
            depth = max(0, depth - 1)
        if ch in seps and (depth == 0 or ch in always):
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _split_entries(text: str) -> list[str]:
    """Split plan text into entries at top-level separators (see the module docstring)."""
    seps = ";\n" if ";" in text else ",;\n"
    return [e.strip() for e in split_top_level(text, seps, always=";\n") if e.strip()]


def _parse_entry(item: str) -> PlanEntry:
    if "=" not in item:
        raise PlanError(
            f"plan entry {item!r} has no '='; write SELECTOR=SPARSITY, e.g. decoder.self_attn=0.5"
        )
    selector, value = item.rsplit("=", 1)
    value = value.strip()
    scope = None
    if "@" in value:
        value, scope = (v.strip() for v in value.split("@", 1))
    if not selector.strip():
        raise PlanError(f"plan entry {item!r} has no selector before '='")
    if value == "drop":
        if scope is not None:
            raise PlanError(f"plan entry {item!r}: 'drop' removes the selected layers; it takes no '@'")
        return PlanEntry(selector, 1.0, unit="layers")
    unit = "weights"
    if scope in UNITS:
        unit, scope = scope, None
    if ":" in value:
        if unit != "weights":
            raise PlanError(f"plan entry {item!r}: an N:M pattern prunes weights, not {unit}")
        return PlanEntry(selector, None, scope=scope, pattern=value)
    text = value[:-1] if value.endswith("%") else value
    try:
        sparsity = float(text)
    except ValueError:
        raise PlanError(
            f"plan entry {item!r}: {value!r} is not a sparsity; write a fraction in [0, 1] "
            "(e.g. 0.5) or an N:M pattern (e.g. 2:4)"
        ) from None
    if value.endswith("%"):
        raise PlanError(
            f"plan entry {item!r}: sparsities are fractions, write {sparsity / 100:g} for {value}"
        )
    return PlanEntry(selector, sparsity, scope=scope, unit=unit)


@dataclass(frozen=True)
class PrunePlan:
    """A validated pruning plan: entries plus how their thresholds are formed.

    Attributes:
        entries: one or more :class:`PlanEntry`; selectors must be distinct strings (that two
            *different* selectors reach the same parameter is checked against the model by
            :func:`asrprune.prune.prune_model`, which raises).
        mode: ``"per_entry"`` (each entry on its own, the default) or ``"global"`` (one
            threshold pooled over all entries; needs one shared sparsity and no patterns).
        score: the pruning method (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``) or the name of a
            precomputed per-weight score passed to ``prune_model`` (``"taylor"``, ...); recorded
            in results. It decides which groupings the entries may use (:func:`score_scopes`);
            an entry without a scope gets the method's default.
        name: optional label for reports.
        repair: ``"none"``, ``"bias"`` (after removing structured units, add their mean
            contribution on the calibration data to the next layer's bias: FLAP's compensation)
            or ``"refit"`` (also refit the next layer's kept columns by ridge least squares on
            the calibration activations); :mod:`asrprune.structured`; only for plans with
            structured entries.

    Raises:
        PlanError (ValueError): invalid fields, duplicate selectors, or a global plan whose
            entries differ in sparsity or use patterns.
    """

    entries: tuple[PlanEntry, ...]
    mode: str = DEFAULT_MODE
    score: str = "magnitude"
    name: str = ""
    repair: str = "none"  # structured units: "bias" adds what removed units contributed on average, "refit" refits

    def __post_init__(self) -> None:
        entries = self.entries
        if isinstance(entries, (PlanEntry, str)) or not isinstance(entries, Iterable):
            raise PlanError(f"plan entries must be a sequence of PlanEntry, got {entries!r}")
        entries = tuple(entries)
        if not entries:
            raise PlanError("a pruning plan needs at least one entry")
        for e in entries:
            if not isinstance(e, PlanEntry):
                raise PlanError(f"plan entries must be PlanEntry objects, got {e!r}")
        object.__setattr__(self, "entries", entries)
        seen: set[str] = set()
        for e in entries:
            if e.selector in seen:
                raise PlanError(f"selector {e.selector!r} appears twice in the plan")
            seen.add(e.selector)
        if self.mode not in MODES:
            raise PlanError(f"plan mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score not in SCORES:
            raise PlanError(f"plan score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not isinstance(self.name, str):
            raise PlanError(f"plan name must be a string, got {self.name!r}")
        if self.repair not in REPAIRS:
            raise PlanError(f"plan repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")
        if self.repair != "none" and not any(e.structured for e in entries):
            raise PlanError(f"repair {self.repair!r} compensates removed structures; the plan has no @neurons/@heads entry")
        allowed = score_scopes(self.score)
        resolved = []
        units = [e for e in entries if e.structured]
        if units and self.score not in UNIT_SCORES:
            raise PlanError(f"plan entry {units[0].selector!r}: {units[0].unit} are ranked by "
                            f"{', '.join(UNIT_SCORES)}; score {self.score!r} cannot remove whole structures")
        if units and self.mode == "global":
            raise PlanError("mode 'global' pools one weight threshold; structured units take no global mode")
        weights = [e for e in entries if not e.structured]
        if weights and self.score in STRUCTURED_ONLY_SCORES:
            raise PlanError(f"plan entry {weights[0].selector!r}: score {self.score!r} ranks structured units "
                            "(@neurons, @heads, @layers) only; prune single weights by magnitude, wanda or sparsegpt")
        for e in entries:
            if e.structured:
                resolved.append(e)
                continue
            if e.scope is None:
                e = dataclasses.replace(e, scope=allowed[0])
            elif e.scope not in allowed and e.pattern is None:
                raise PlanError(
                    f"plan entry {e.selector!r}: score {self.score!r} prunes with the groupings "
                    f"{', '.join(allowed)}, not {e.scope!r}"
                )
            resolved.append(e)
        entries = tuple(resolved)
        object.__setattr__(self, "entries", entries)
        if self.mode == "global" and self.score in CALIBRATED_SCORES:
            raise PlanError(
                f"mode 'global' pools one magnitude threshold over all entries; score {self.score!r} "
                "has no such threshold (give each entry its sparsity instead)"
            )
        if self.mode == "global":
            patterned = [e.selector for e in entries if e.pattern is not None]
            if patterned:
                raise PlanError(
                    f"mode 'global' pools one threshold over all entries and cannot use N:M "
                    f"patterns (entries {', '.join(patterned)})"
                )
            sparsities = sorted({e.sparsity for e in entries})
            if len(sparsities) > 1:
                raise PlanError(
                    "mode 'global' needs one sparsity shared by all entries, got "
                    + ", ".join(f"{e.selector}={e.sparsity:g}" for e in entries)
                )

    @property
    def structured(self) -> bool:
        """Whether any entry removes whole structures (neurons, heads, layers)."""
        return any(e.structured for e in self.entries)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, mode: str = DEFAULT_MODE, score: str = "magnitude", name: str = "") -> "PrunePlan":
        """Parse the CLI form, e.g. ``"decoder.self_attn=0.5,encoder.layers[-4:]=0.5"``.

        Raises:
            PlanError: malformed text or invalid values (the message quotes the entry).
        """
        if not isinstance(text, str) or not text.strip():
            raise PlanError("--plan is empty; write e.g. decoder.self_attn=0.5,late_encoder=0.5")
        entries = tuple(_parse_entry(item) for item in _split_entries(text))
        return cls(entries, mode=mode, score=score, name=name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> "PrunePlan":
        """Build from the YAML/JSON mapping form (see the module docstring).

        ``entries`` may also be a mapping ``{selector: sparsity}`` for short hand-written plans.

        Raises:
            PlanError: unknown keys, missing entries, invalid values; the message names ``source``.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a mapping with 'entries', got {type(data).__name__}")
        allowed = {"entries", "mode", "score", "name", "repair"}
        check_keys(data, allowed, source)
        if "entries" not in data:
            raise PlanError(f"{source}: 'entries' is missing")
        raw = data["entries"]
        try:
            if isinstance(raw, Mapping):
                entries = tuple(
                    PlanEntry(str(k), None, pattern=str(v)) if isinstance(v, str) and ":" in v else PlanEntry(str(k), v)
                    for k, v in raw.items()
                )
            elif isinstance(raw, list):
                entries = tuple(
                    PlanEntry.from_dict(e, where=f"{source}: entries[{i}]") for i, e in enumerate(raw)
                )
            else:
                raise PlanError(f"{source}: 'entries' must be a list (or a selector: sparsity mapping)")
            return cls(
                entries,
                mode=data.get("mode", DEFAULT_MODE),
                score=data.get("score", "magnitude"),
                name=data.get("name", "") or "",
                repair=data.get("repair", "none") or "none",
            )
        except PlanError as exc:
            msg = str(exc)
            raise PlanError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "PrunePlan":
        """Read a plan from a YAML file.

        Raises:
            FileNotFoundError: the file does not exist (named in the message).
            PlanError: invalid YAML or plan, naming the file.
        """
        return cls.from_dict(load_yaml(path, "plan"), source=str(Path(path)))

    @classmethod
    def load(cls, spec: str | os.PathLike, **kwargs: Any) -> "PrunePlan":
        """A plan from a YAML path (``*.yaml``/``*.yml`` or an existing file) or CLI text.

        ``kwargs`` (mode, score, name) apply to CLI text only.
        """
        text = os.fspath(spec)
        if text.endswith((".yaml", ".yml")) or (("=" not in text) and Path(text).is_file()):
            return cls.from_yaml(text)
        return cls.parse(text, **kwargs)

    # -- output ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form that :meth:`from_dict` reads back."""
        d: dict[str, Any] = {"mode": self.mode, "score": self.score}
        if self.name:
            d["name"] = self.name
        if self.repair != "none":
            d["repair"] = self.repair
        d["entries"] = [e.to_dict() for e in self.entries]
        return d

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back into an equal plan."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def to_text(self) -> str:
        """The CLI form (``;``-separated when a selector contains a top-level comma)."""
        parts = [e.to_text() for e in self.entries]
        sep = ";" if any("," in p for p in parts) else ","
        return sep.join(parts)

    @property
    def selectors(self) -> tuple[str, ...]:
        return tuple(e.selector for e in self.entries)
