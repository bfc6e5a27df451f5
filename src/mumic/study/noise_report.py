"""OUT/report.md, OUT/summary.json and the plots of the label-noise study (mumic.study.noise_audit)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mumic.io import atomic_write_json, atomic_write_text

RANKINGS = (("mumic/neighbours", "MuMIC probabilities, neighbours rule (mumic audit's default)"),
            ("mumic/margin", "MuMIC probabilities, margin rule"),
            ("mumic/llr", "MuMIC probabilities, llr rule"),
            ("mumic/cleanlab", "MuMIC probabilities, cleanlab"),
            ("baseline/neighbours", "baseline probabilities, neighbours rule"),
            ("baseline/margin", "baseline probabilities, margin rule"),
            ("baseline/llr", "baseline probabilities, llr rule"),
            ("baseline/cleanlab", "baseline probabilities, cleanlab"))
COLOURS = ["C0", "C0", "C0", "C3", "C1", "C1", "C1", "C3"]
FIXED_ROWS = ("clean", "noisy", "oracle")  # repair references: clean labels, noisy labels, every injected error fixed


def _variant_title(name: str) -> str:
    if name.startswith("fixed-"):
        km, kw = name.split("-")[1:]
        parts = [f"top {km} missing tags added"] * (km != "0") + [f"top {kw} wrong tags removed"] * (kw != "0")
        return "noisy, " + " and ".join(parts or ["nothing changed"])
    return f"noisy, rows of the top {name.split('-')[1]} suspects of each kind dropped"


def _ms(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def _fmt(values: list[float], scale: float = 1.0) -> str:
    m, s = _ms(values)
    return "n/a" if math.isnan(m) else f"{m * scale:.3f} ± {s * scale:.3f}"


def summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline means over seeds (see the module docstring of noise_audit)."""
    det = lambda key, kind, f="ap": _ms([s["detection"][key][kind][f] for s in seeds])[0]  # noqa: E731
    def rep(name: str, f: str = "gap10") -> float:
        return _ms([(s["repair"][name] if name in FIXED_ROWS else s["repair"]["variants"][name])[f] for s in seeds])[0]

    # the repaired variant is chosen on validation GAP@10, never on test
    repaired = max(seeds[0]["repair"]["variants"], key=lambda n: rep(n, "val_gap10"))
    rob = {m: {k: _ms([s["robust"][m][k]["gap10"] for s in seeds])[0] for k in ("noisy", "clean", "robust_noisy", "robust_clean")}
           for m in ("mumic", "baseline")}
    rob_val = {m: {k: _ms([s["robust"][m][k]["val_gap10"] for s in seeds])[0] for k in ("noisy", "robust_noisy")}
               for m in ("mumic", "baseline")}
    return {
        "seeds": [s["seed"] for s in seeds],
        "rule": "neighbours",
        "ap_missing_mumic": det("mumic/neighbours", "missing"), "ap_missing_cleanlab": det("mumic/cleanlab", "missing"),
        "ap_wrong_mumic": det("mumic/neighbours", "wrong"), "ap_wrong_cleanlab": det("mumic/cleanlab", "wrong"),
        "ap_missing_mumic_margin": det("mumic/margin", "missing"), "ap_wrong_mumic_margin": det("mumic/margin", "wrong"),
        "ap_missing_mumic_llr": det("mumic/llr", "missing"), "ap_wrong_mumic_llr": det("mumic/llr", "wrong"),
        "ap_missing_baseline": det("baseline/neighbours", "missing"), "ap_missing_baseline_cleanlab": det("baseline/cleanlab", "missing"),
        "ap_wrong_baseline": det("baseline/neighbours", "wrong"), "ap_wrong_baseline_cleanlab": det("baseline/cleanlab", "wrong"),
        "gap10_clean": rep("clean"), "gap10_noisy": rep("noisy"), "gap10_repaired": rep(repaired), "repaired_by": repaired,
        "gap10_oracle": rep("oracle"), "map_oracle": rep("oracle", "map_macro"),
        **{f"gap10_{n}": rep(n) for n in seeds[0]["repair"]["variants"]},
        "map_clean": rep("clean", "map_macro"), "map_noisy": rep("noisy", "map_macro"), "map_repaired": rep(repaired, "map_macro"),
        "drop_mumic_robust": rob["mumic"]["robust_clean"] - rob["mumic"]["robust_noisy"],
        "drop_baseline_robust": rob["baseline"]["robust_clean"] - rob["baseline"]["robust_noisy"],
        "drop_mumic_plain": rob["mumic"]["clean"] - rob["mumic"]["noisy"],
        "drop_baseline_plain": rob["baseline"]["clean"] - rob["baseline"]["noisy"],
        "robust_chosen_on_val": {m: rob_val[m]["robust_noisy"] > rob_val[m]["noisy"] for m in rob_val},
        "robust_val_gap10": rob_val,
    }


def _plots(out: Path, seeds: list[dict[str, Any]]) -> None:
    from mumic.report import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("missing", "wrong")):
        keys = [k for k, _ in RANKINGS]
        ms = [_ms([s["detection"][k][kind]["ap"] for s in seeds]) for k in keys]
        ax.bar(range(len(keys)), [m for m, _ in ms], yerr=[e for _, e in ms], color=COLOURS)
        ax.set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
        ax.set_title(f"{kind} tags: average precision over the ranking")
    fig.tight_layout()
    save_figure(fig, out / "detection_ap.png")
    fig, ax = plt.subplots(figsize=(9, 4))
    variants = list(seeds[0]["repair"]["variants"])
    names = ["clean", "noisy", "oracle", *variants]
    ms = [_ms([(s["repair"][n] if n in FIXED_ROWS else s["repair"]["variants"][n])["gap10"] for s in seeds]) for n in names]
    ax.bar(names, [m for m, _ in ms], yerr=[e for _, e in ms], color=["C2", "C3", "C7"] + ["C0"] * len(variants))
    ax.tick_params(axis="x", labelsize=8)
    lo = min(m for m, _ in ms if not math.isnan(m))
    ax.set_ylim(max(0.0, lo - 0.08), None)
    ax.set_title("MuMIC test GAP@10: clean, noisy, repaired")
    fig.tight_layout()
    save_figure(fig, out / "repair_gap10.png")


def _target(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _train_minutes(out: Path) -> str:
    """Total and per-run training time of the runs under OUT/runs (their metrics.json train_time_s)."""
    from mumic.readers import read_json

    times = [float(read_json(m).get("train_time_s", 0.0)) for m in sorted((out / "runs").rglob("metrics.json"))]
    if not times:
        return "n/a"
    return f"{sum(times) / 60:.0f} min in all, {len(times)} runs, median {float(np.median(times)):.0f} s per run (or fold)"


def _robust_plot(out: Path, seeds: list[dict[str, Any]]) -> None:
    from mumic.report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    settings = (("plain", ("clean", "noisy")), ("robust", ("robust_clean", "robust_noisy")))
    bars = [(f"{m}\n{name}", [x["robust"][m][c]["gap10"] - x["robust"][m][nz]["gap10"] for x in seeds])
            for m in ("mumic", "baseline") for name, (c, nz) in settings]
    ms = [_ms(v) for _, v in bars]
    ax.bar([b for b, _ in bars], [m * 100 for m, _ in ms], yerr=[e * 100 for _, e in ms], color=["C0", "C9", "C1", "C8"])
    ax.set_ylabel("test GAP@10 lost to noise (points)")
    ax.set_title("GAP@10 lost to noise, plain and with the robust option")
    fig.tight_layout()
    save_figure(fig, out / "robust_drop.png")


def _detection_lines(seeds: list[dict[str, Any]], kind: str) -> list[str]:
    errors = seeds[0]["detection"]["mumic/neighbours"][kind]
    lines = [f"### {kind} tags ({errors['errors']} injected per seed; {errors['candidates']} candidate cells)", "",
             "| probabilities / ranking | AP | P@100 | P@500 | P@1000 | R@100 | R@500 | R@1000 |", "|---|---|---|---|---|---|---|---|"]
    for key, title in RANKINGS:
        d = [x["detection"][key][kind] for x in seeds]
        lines.append(f"| {title} | {_fmt([v['ap'] for v in d])} | " +
                     " | ".join(_fmt([v[f'{m}@{k}'] for v in d]) for m in ("p", "r") for k in (100, 500, 1000)) + " |")
    return lines + [""]


def write_noise_report(out: Path, doc: dict[str, Any], seeds: list[dict[str, Any]], *, config: str, elapsed: float,
                       seeds_planned: int, dev: dict[str, Any] | None = None, data: str = "") -> Path:
    out = Path(out)
    s = summary(seeds)
    atomic_write_json(out / "summary.json", s)
    _plots(out, seeds)
    _robust_plot(out, seeds)
    n = len(seeds)
    noise, b = doc["noisy"], doc["base"]
    lines = [
        "# Noisy labels on EmojiTags: finding the wrong tags, repairing them, learning through them",
        "",
        f"Regenerate (finished runs are reused): `mumic noise-study {config} --out {out}` with the data set at `data/emoji/` "
        "(`mumic demo` builds it; elsewhere add `--manifest DIR/manifest.csv --labels-file DIR/labels.yaml`)." +
        (f" This report was made with {data}." if data else ""),
        "",
        f"Sizes: {n} seed(s) ({', '.join(str(x['seed']) for x in seeds)}) of {seeds_planned} planned; {doc.get('folds', 5)}-fold "
        f"audits; every training {b.get('max_steps')} optimizer steps of batch {b.get('batch_size')} on frozen towers "
        f"({b.get('backbone')}, {b.get('image_size')} px, cached features); development seed "
        f"{dev['seed'] if dev else 'none'} (audits only). Training time of the study's runs: {_train_minutes(out)} "
        f"on a 2-core CPU shared with other jobs; this call took {elapsed / 60:.0f} min (finished runs reused).",
        "",
        f"Noise (the ablation study's, seeded, training rows only): {noise['drop_positives']:.0%} of the training positives "
        f"dropped, false positives added at {noise['add_false_positives']:.0%} of them, {noise.get('verified_negatives', 0):.0%} "
        "of each row's true negatives listed as explicit negatives. Base settings: " +
        ", ".join(f"{k}={v}" for k, v in b.items() if k not in ("manifest", "labels_file")) +
        f"; MuMIC {doc['mumic']}, baseline {doc['baseline']}; clean labels trained with {doc.get('clean') or {}}.",
        "",
        "## Detection of the injected errors",
        "",
        "Candidates: *missing* = every unlisted, not explicitly negative (row, label) cell of the training rows; *wrong* = "
        "every listed cell. The truth is the injected cells. Each ranking orders all candidates; average precision (AP) is "
        "over the whole ranking; P@k / R@k are precision and recall of its top k (mean ± std over seeds). Every ranking of a "
        "row group uses the *same* out-of-fold probabilities p.",
        "",
        "- *neighbours* (`mumic audit`'s default): E = logit(p) + 1/2 (logit(v) - logit(prior)), v = the rate at which the "
        "row's 10 most similar other training rows list the label (similarity = 1/2 cosine of the standardized out-of-fold "
        "logit vectors + 1/2 cosine of the listed-label vectors; one pseudo-row at the prior); missing = E, wrong = -E. "
        "E is the log-odds that the label applies: the model's own plus a damped log-likelihood ratio of the look-alikes' "
        "votes. k = 10, the weight 1/2 and the 1/2 mix were chosen on the development seed's audits, never on the reported "
        "seeds.",
        "- *margin*: logit(p) - logit(t), t = the label's calibrated validation threshold of the fold's run (or its negative).",
        "- *llr*: the per-label Gaussian log-likelihood ratio of the logits plus the prior log-odds (`mumic.audit.scores`).",
        "- *cleanlab*: `cleanlab.multilabel_classification.rank.get_label_quality_scores_per_class` (2.9.0, self-confidence) "
        "on the same probabilities, ranked by 1 - quality.",
        "",
        *_detection_lines(seeds, "missing"), *_detection_lines(seeds, "wrong"),
    ]
    if dev:
        d = dev["detection"]
        lines += [f"Development seed {dev['seed']} (where the neighbours rule's k and weights were chosen; not in the means above), AP "
                  "missing / wrong: " + "; ".join(f"{key} {d[key]['missing']['ap']:.3f} / {d[key]['wrong']['ap']:.3f}"
                                                  for key, _ in RANKINGS) + ".", ""]
    lines += ["On EmojiTags every emoji is drawn in three artwork styles that share one tag set and one split, so most training "
              "images have look-alikes whose (independently corrupted) tags vote for the true ones; the neighbours rule uses "
              "them, cleanlab's per-cell self-confidence does not. A catalogue without near-duplicates gains less from the votes.",
              "", "![detection](detection_ap.png)", "", "## Repair", "",
              "MuMIC retrained on manifests repaired from the MuMIC audit's default ranking (test split, mean ± std over seeds): "
              "the top suspects fixed (missing tags added, wrong tags removed) or the rows of the top suspects of each kind "
              f"(missing, wrong, swapped) dropped. The repaired figure in summary.json is the variant with the best *validation* "
              f"GAP@10 (`{s['repaired_by']}`).", "",
              "| training labels | GAP@10 | macro mAP | val GAP@10 |", "|---|---|---|---|"]
    for name in (*FIXED_ROWS, *seeds[0]["repair"]["variants"]):
        title = {"clean": "clean labels", "noisy": "noisy labels",
                 "oracle": "noisy, every injected error fixed (the ceiling of a repair)"}.get(name) or _variant_title(name)
        vals = [x["repair"][name] if name in FIXED_ROWS else x["repair"]["variants"][name] for x in seeds]
        lines.append(f"| {title}{' (chosen on val)' if name == s['repaired_by'] else ''} | {_fmt([v['gap10'] for v in vals])} | "
                     f"{_fmt([v['map_macro'] for v in vals])} | {_fmt([v['val_gap10'] for v in vals])} |")
    lost = s["gap10_clean"] - s["gap10_noisy"]
    gain = (s["gap10_repaired"] - s["gap10_noisy"]) / lost if lost > 0 else float("nan")
    counts = seeds[0]["repair"]["counts"]
    lines += ["", f"Seed {seeds[0]['seed']}'s repaired manifests: " +
              "; ".join(f"{k}: {v.get('added', 0)} added, {v.get('removed', 0)} removed, {v.get('dropped_rows', 0)} rows dropped"
                        for k, v in counts.items()) + ".",
              "", f"Noise costs {lost * 100:.1f} GAP@10 points (clean {s['gap10_clean']:.3f}, noisy {s['gap10_noisy']:.3f}); the "
              f"chosen repair wins back {(s['gap10_repaired'] - s['gap10_noisy']) * 100:+.1f} points ({gain:.0%} of the loss). Macro "
              f"mAP: clean {s['map_clean']:.3f}, noisy {s['map_noisy']:.3f}, repaired {s['map_repaired']:.3f}. With every injected "
              f"error fixed (tags as in the clean manifest, the noisy manifest's explicit negatives, unlisted unknown) GAP@10 is "
              f"{s['gap10_oracle']:.3f}: {(s['gap10_oracle'] - s['gap10_noisy']) / lost if lost > 0 else float('nan'):.0%} of the "
              "loss is the tag errors' (what a repair can win back); the rest is what training on the clean labels gains from "
              "knowing every negative.",
              "", "![repair](repair_gap10.png)", "", "## Noise-robust training", "",
              f"Option: negatives softly bootstrapped toward the model's belief (`{doc['robust_mumic']['loss']}` / "
              f"`{doc['robust_baseline']['loss']}`, target 0.5 x sg(p) on every negative cell; settings {doc['robust_mumic']}), "
              "against each model's plain setting (unlisted unknown under noise). Drop = GAP@10 on clean labels minus on noisy "
              "labels (test).", "",
              "| model | setting | clean GAP@10 | noisy GAP@10 | drop | noisy val GAP@10 |", "|---|---|---|---|---|---|"]
    for m in ("mumic", "baseline"):
        for setting, (c, nz) in (("plain", ("clean", "noisy")), ("robust option", ("robust_clean", "robust_noisy"))):
            cl = [x["robust"][m][c]["gap10"] for x in seeds]
            no = [x["robust"][m][nz]["gap10"] for x in seeds]
            lines.append(f"| {m} | {setting} | {_fmt(cl)} | {_fmt(no)} | {_fmt([a - b for a, b in zip(cl, no)])} | "
                         f"{_fmt([x['robust'][m][nz]['val_gap10'] for x in seeds])} |")
    chosen = s["robust_chosen_on_val"]
    lines += ["", "Chosen on validation (noisy val GAP@10, robust option vs. the plain noisy setting): " +
              ", ".join(f"{m}: {'robust option' if v else 'plain setting'}" for m, v in chosen.items()) + ". The target below compares "
              "the drops *with* the option for both models (summary.json drop_mumic_robust / drop_baseline_robust), whatever "
              "validation chose; the plain drops are drop_mumic_plain / drop_baseline_plain.", "",
              "![robust](robust_drop.png)", ""]
    dm, dc = s["ap_missing_mumic"] - s["ap_missing_cleanlab"], s["ap_wrong_mumic"] - s["ap_wrong_cleanlab"]
    less = s["drop_baseline_robust"] - s["drop_mumic_robust"]
    lines += ["## Targets", "",
              f"- Detection AP at least 10 points above cleanlab's on the same (MuMIC) probabilities: missing "
              f"{s['ap_missing_mumic']:.3f} vs. {s['ap_missing_cleanlab']:.3f} ({dm * 100:+.1f} points), wrong {s['ap_wrong_mumic']:.3f} "
              f"vs. {s['ap_wrong_cleanlab']:.3f} ({dc * 100:+.1f} points): {_target(dm >= 0.10 and dc >= 0.10)}"
              f" (missing {_target(dm >= 0.10)}, wrong {_target(dc >= 0.10)}).",
              f"- Repair wins back at least half of the GAP@10 lost to noise: clean {s['gap10_clean']:.3f}, noisy "
              f"{s['gap10_noisy']:.3f}, repaired ({s['repaired_by']}) {s['gap10_repaired']:.3f}: {gain:.0%} won back: "
              f"{_target(gain >= 0.5)}.",
              f"- MuMIC + robust option loses at least 2 points less than baseline + option: MuMIC drops "
              f"{s['drop_mumic_robust'] * 100:.1f} points, the baseline {s['drop_baseline_robust'] * 100:.1f}: {less * 100:+.1f} points: "
              f"{_target(less >= 0.02)}.",
              ""]
    if n < seeds_planned or n < 3:
        lines += [f"Only {n} seed(s) finished of the 3 the protocol asks for; the command above runs the rest (finished runs are "
                  "reused).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
