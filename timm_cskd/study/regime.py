"""The calibration regime of one dataset in words, generated from its tables' numbers.

Every sentence states a number shown in the dataset's tables (means as displayed there, or a bold cell
of the differences table): whether the baseline is over- or under-confident, which methods flip the sign
of its confidence gap, which differ from it beyond seed noise, and how far temperature scaling alone
takes its ECE.
"""

from __future__ import annotations

import numpy as np

from timm_cskd.study.tables import baseline_label, columns_for, differences, fmt_of, mean_of

__all__ = ["METRIC_NAMES", "regime_paragraph"]

METRIC_NAMES = {
    "top1_err": "top-1 error",
    "top5_err": "top-5 error",
    "ece": "ECE",
    "nll": "NLL",
    "recall_at_1": "R@1",
    "ece_ts": "ECE after TS",
    "nll_ts": "NLL after TS",
}


def _shown(runs: list[dict], key: str) -> str:
    return fmt_of(key).format(mean_of(runs, key))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _spread_text(spread: float) -> str:
    return fmt_of("conf_gap").replace("+", "").format(spread)


def _gap_sign(runs: list[dict]) -> tuple[int, float]:
    """The sign of the runs' mean confidence gap, 0 where it is not settled: shown as 0.00, within the
    seeds' spread of 0, or not finite; and that spread (the sample std, 0 for one seed)."""
    gap = mean_of(runs, "conf_gap")
    spread = float(np.std([m["conf_gap"] for m in runs], ddof=1)) if len(runs) > 1 else 0.0
    if gap is None or not np.isfinite(gap) or float(_shown(runs, "conf_gap")) == 0 or abs(gap) <= spread:
        return 0, spread
    return (1 if gap > 0 else -1), spread


def _baseline_sentence(name: str, runs: list[dict], calib_split: str | None) -> tuple[str, int]:
    """The baseline's regime, and the sign of its gap (0 where its seeds do not settle it)."""
    gap = mean_of(runs, "conf_gap")
    sign, spread = _gap_sign(runs)
    ece = f"ECE {_shown(runs, 'ece')}"
    if mean_of(runs, "ece_ts") is not None:
        where = f" fitted on the `{calib_split}` split" if calib_split else ""
        ece += f" ({_shown(runs, 'ece_ts')} after temperature scaling{where})"
    if not sign:
        return (
            f"The baseline {name} is neither clearly over- nor under-confident: its confidence gap "
            f"{_shown(runs, 'conf_gap')} ± {_spread_text(spread)} lies within its seed spread of 0; {ece}.",
            0,
        )
    regime = "over-confident" if gap > 0 else "under-confident"
    sentence = f"The baseline {name} is {regime}: confidence gap {_shown(runs, 'conf_gap')} and {ece}."
    return sentence, sign


def _flip_sentences(name: str, rows, sign: int) -> list[str]:
    others = [
        (label, runs, *_gap_sign(runs))
        for label, runs in rows
        if label != name and mean_of(runs, "conf_gap") is not None
    ]
    flipped = [(label, runs) for label, runs, their_sign, _ in others if their_sign == -sign]
    unsettled = [
        f"{label} ({_shown(runs, 'conf_gap')} ± {_spread_text(spread)})"
        for label, runs, their_sign, spread in others
        if not their_sign and np.sign(float(_shown(runs, "conf_gap"))) == -sign
    ]
    within = []
    if unsettled:
        gap, have, lie, their = (
            ("gap", "has", "lies", "its") if len(unsettled) == 1 else ("gaps", "have", "lie", "their")
        )
        within.append(
            f"The {gap} of {_join(unsettled)} {have} the opposite sign to {name}'s but {lie} within "
            f"{their} seed spread of 0."
        )
    if not flipped:
        beyond = " beyond seed noise" if unsettled else ""
        return [f"No method flips the sign of {name}'s confidence gap{beyond}.", *within]
    theirs, other = (
        ("under-confident", "over-confident") if sign > 0 else ("over-confident", "under-confident")
    )
    gaps = _join([f"{label} ({_shown(runs, 'conf_gap')})" for label, runs in flipped])
    eces = _join(
        [
            f"{label} {_shown(runs, 'ece')}" if len(flipped) > 1 else _shown(runs, "ece")
            for label, runs in flipped
        ]
    )
    verb, their = ("flips", "its") if len(flipped) == 1 else ("flip", "their")
    return [
        f"{gaps} {verb} the sign of the gap: {theirs} where {name} is {other}, so {their} ECE ({eces}) "
        f"measures miscalibration in the opposite direction to {name}'s.",
        *within,
    ]


# Welch.why_not in words, in the order they are listed.
WHY_NO_T = {
    "one seed": "one seed",
    "no seed spread": "no spread over seeds",
    "not finite": "a value that is not finite",
}


def _why_untested(results) -> str:
    reasons = {w.why_not for w in results}
    return " or ".join(words for why, words in WHY_NO_T.items() if why in reasons) or "no metric in common"


def _noise_sentences(name: str, rows, found) -> list[str]:
    untested = [label for label, by_key in found.items() if all(w.t is None for w in by_key.values())]
    untested_results = [w for label in untested for w in found[label].values()]
    if len(untested) == len(found):
        return [
            f"With {_why_untested(untested_results)} no method can be told from {name} beyond seed noise."
        ]
    rules = {key: rule for key, _, _, rule in columns_for(rows)}
    tested = {label: by_key for label, by_key in found.items() if label not in untested}
    which = "No tested method" if untested else "No method"
    better, worse = [], []
    for label, by_key in tested.items():
        wins, losses = [], []
        for key, result in by_key.items():
            if rules[key] == "zero" or not result.significant:
                continue
            improves = result.difference < 0 if rules[key] == "min" else result.difference > 0
            (wins if improves else losses).append(METRIC_NAMES.get(key, key))
        better += [f"{label} on {_join(wins)}"] if wins else []
        worse += [f"{label} on {_join(losses)}"] if losses else []
    sentences = []
    if better:
        sentences.append(f"Better than {name} beyond seed noise (bold differences): {'; '.join(better)}.")
    if worse:
        sentences.append(f"Worse than {name} beyond seed noise: {'; '.join(worse)}.")
    if not better and not worse:
        sentences.append(f"{which} is better or worse than {name} beyond seed noise on any metric.")
    top1 = [
        label for label, by_key in tested.items() if "top1_err" in by_key and by_key["top1_err"].significant
    ]
    if (better or worse) and not top1:
        sentences.append(f"{which}'s top-1 error differs from {name}'s beyond seed noise.")
    if untested:
        verb = "has" if len(untested) == 1 else "have"
        sentences.append(
            f"{_join(untested)} {verb} no t against {name} ({_why_untested(untested_results)}): "
            "no significance is read for " + ("it." if len(untested) == 1 else "them.")
        )
    return sentences


def _scaling_sentences(name: str, rows, found, calib_split: str | None) -> list[str]:
    base_runs = dict(rows)[name]
    if mean_of(base_runs, "ece_ts") is None:
        split = f" (no `{calib_split}` split)" if calib_split else ""
        return [
            f"No temperature was fitted{split}, so whether scaling alone closes {name}'s gap is not measured."
        ]
    others = [(label, mean_of(runs, "ece")) for label, runs in rows if label != name]
    others = [(label, ece) for label, ece in others if ece is not None and np.isfinite(ece)]
    base_ts = _shown(base_runs, "ece_ts")
    sentence = f"Temperature scaling alone takes {name}'s ECE from {_shown(base_runs, 'ece')} to {base_ts}"
    if others and np.isfinite(float(base_ts)):
        label, lowest = min(others, key=lambda item: item[1])
        lowest_text = fmt_of("ece").format(lowest)
        relation = "at or below" if float(base_ts) <= float(lowest_text) else "above"
        sentence += f", {relation} the lowest ECE another method reaches without it ({label}, {lowest_text})"
    sentences = [sentence + "."]
    lower = [
        label
        for label, by_key in found.items()
        if "ece_ts" in by_key and by_key["ece_ts"].significant and by_key["ece_ts"].difference < 0
    ]
    if any("ece_ts" in by_key and by_key["ece_ts"].t is not None for by_key in found.values()):
        if lower:
            verb = "has" if len(lower) == 1 else "have"
            sentences.append(
                f"After temperature scaling {_join(lower)} {verb} a lower ECE than {name} beyond seed noise."
            )
        else:
            sentences.append(
                f"After temperature scaling no method's ECE is below {name}'s beyond seed noise."
            )
    return sentences


def regime_paragraph(rows, baseline: str | None = None, calib_split: str | None = None) -> str:
    """One paragraph on ``rows`` (``[(label, [metrics, ...]), ...]``) against the baseline row."""
    name = baseline_label(rows, baseline)
    base_runs = dict(rows).get(name)
    if not base_runs or mean_of(base_runs, "conf_gap") is None:
        return f"No regime can be read: the baseline {name} has no evaluated run with a confidence gap."
    if not np.isfinite(mean_of(base_runs, "conf_gap")):
        return f"No regime can be read: the baseline {name}'s confidence gap is not a finite number."
    found = differences(rows, name)
    first, sign = _baseline_sentence(name, base_runs, calib_split)
    sentences = [first]
    if sign:
        sentences += _flip_sentences(name, rows, sign)
    sentences += _noise_sentences(name, rows, found) if found else []
    sentences += _scaling_sentences(name, rows, found, calib_split)
    return " ".join(sentences)
