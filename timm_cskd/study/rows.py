"""A study's rows: each a method with its full hyper-parameters under a unique label, from ``--methods``
entries (``cskd:temperature=1,lambda=2`` or ``{name, label, kwargs}``) and sweeps (one row per
combination of the listed values), and the baseline row differences are taken against."""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass

from timm_cskd.errors import ConfigError
from timm_cskd.methods import get_method, method_hparams
from timm_cskd.study.errors import StudyError

__all__ = ["Row", "baseline_row", "literal", "method_rows", "parse_method_spec", "sweep_rows"]


@dataclass(frozen=True)
class Row:
    """A table row: a method with its full hyper-parameters, under a unique label."""

    label: str
    method: str
    kwargs: dict


def literal(text: str):
    """A command-line value as timm's ParseKwargs (the trainer's --method-kwargs) reads it."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``cskd:temperature=1,lambda=2`` -> ``("cskd", {"temperature": 1, "lambda": 2})``."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"method entry '{spec}': expected METHOD[:KEY=VALUE,...], got '{item}'")
        kwargs[key.strip()] = literal(value.strip())
    if not name:
        raise StudyError(f"method entry '{spec}' names no method")
    return name.strip(), kwargs


def _label(name: str, kwargs: dict) -> str:
    return f"{name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else name


def _row(method: str, given: dict, label: str | None, base_kwargs: dict, where: str) -> Row:
    try:
        cls = get_method(method)
        defaults = {k: v for k, v in base_kwargs.items() if k in cls.hparams}
        kwargs = method_hparams(cls, {**defaults, **given})
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from e
    return Row(label or _label(method, given), method, kwargs)


def method_rows(entries, base_kwargs: dict) -> list[Row]:
    rows = []
    for i, entry in enumerate(entries, 1):
        where = f"methods entry {i}"
        if isinstance(entry, str):
            name, given = parse_method_spec(entry)
            rows.append(_row(name, given, None, base_kwargs, f"{where} '{entry}'"))
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            raise StudyError(
                f"{where}: expected 'METHOD[:KEY=VALUE,...]' or {{name, label, kwargs}}, got {entry!r}"
            )
        unknown = set(entry) - {"name", "label", "kwargs"}
        if unknown:
            raise StudyError(f"{where}: unknown keys {sorted(unknown)} (valid: name, label, kwargs)")
        given = entry.get("kwargs") or {}
        if not isinstance(given, dict):
            raise StudyError(f"{where}: kwargs must be a mapping, got {given!r}")
        rows.append(
            _row(str(entry["name"]), given, entry.get("label"), base_kwargs, f"{where} ({entry['name']})")
        )
    return rows


def sweep_rows(sweeps, base_kwargs: dict) -> list[Row]:
    """Each sweep ``{method, label?, kwargs?, KEY: [values], ...}``: one row per combination of the
    listed values, labelled ``label (KEY=value, ...)``."""
    rows = []
    for i, sweep in enumerate([sweeps] if isinstance(sweeps, dict) else sweeps, 1):
        if not isinstance(sweep, dict) or "method" not in sweep:
            raise StudyError(f"sweep {i}: expected {{method: NAME, KEY: [values], ...}}, got {sweep!r}")
        method, fixed = str(sweep["method"]), sweep.get("kwargs") or {}
        swept = {
            k: v if isinstance(v, list) else [v]
            for k, v in sweep.items()
            if k not in ("method", "label", "kwargs")
        }
        if not swept or any(not values for values in swept.values()):
            raise StudyError(f"sweep {i} ({method}): list the values of at least one hyper-parameter")
        prefix = str(sweep.get("label", method))
        for values in itertools.product(*swept.values()):
            given = dict(zip(swept, values))
            rows.append(
                _row(method, {**fixed, **given}, _label(prefix, given), base_kwargs, f"sweep {i} ({method})")
            )
    return rows


def baseline_row(rows: list[Row], baseline: str | None) -> str:
    """The baseline's label: the first row, or the row ``baseline`` labels (or whose method it is, if
    only one row has that method)."""
    if baseline is None:
        return rows[0].label
    if any(r.label == baseline for r in rows):
        return baseline
    by_method = [r.label for r in rows if r.method == baseline]
    if len(by_method) == 1:
        return by_method[0]
    raise StudyError(
        f"--baseline {baseline!r} is not one row's label"
        + (f" (method {baseline} has rows {', '.join(by_method)})" if by_method else "")
        + f"; rows: {', '.join(r.label for r in rows)}"
    )
