"""The run report: ``<run>/report.md`` and a self-contained ``<run>/report.html`` with PNG plots beside them.

Everything comes from the stage manifests (``<run>/<stage>/stage.json``) and the files they point at
(``metrics.jsonl`` of training stages, the influence and co-evolution outputs, the decode benchmark), so the
report can be rebuilt at any time with ``mobilellm-r1 run RECIPE --only report``. Each section names the
command that reproduces its numbers.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..config import Recipe
from ..deploy.bench import grids
from .plots import plot_histograms, plot_loo, plot_losses, plot_mixtures, read_metrics


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


class _Doc:
    """Markdown and HTML written side by side from the same calls."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.md: list[str] = []
        self.html: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def cmd(self, command: str) -> None:
        self.md.append(f"```\n{command}\n```\n")
        self.html.append(f"<pre>{html.escape(command)}</pre>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        if not rows:
            self.p("(no rows)")
            return
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for r in rows:
            self.md.append("| " + " | ".join(_fmt(c) for c in r) + " |")
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def quote(self, title: str, text: str) -> None:
        """A model's completion, verbatim (escaped in the HTML: a model may write anything)."""
        self.md.append(f"{title}\n\n```text\n{text}\n```\n")
        self.html.append(f"<p><b>{html.escape(title)}</b></p><pre>{html.escape(text)}</pre>")

    def img(self, path: Path | None, alt: str) -> None:
        if path is None:
            self.p(f"({alt}: nothing to plot)")
            return
        rel = os.path.relpath(path, self.run_dir)
        self.md.append(f"![{alt}]({rel})\n")
        data = base64.b64encode(path.read_bytes()).decode()  # inline: the HTML is one self-contained file
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}pre{background:#f5f5f5;padding:.5em;overflow-x:auto}img{max-width:100%;border:1px solid #ddd}"""


def _examples(samples: str, k: int = 2) -> tuple[list[dict], list[dict]]:
    import json

    path = Path(samples)
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [r for r in rows if r.get("correct")][:k], [r for r in rows if not r.get("correct")][:k]


def _scorecard_section(doc: _Doc, sc: dict[str, Any], rp: str, run_dir: Path) -> None:
    card = sc["card"]
    doc.h(2, f"Scorecard: {card['task']}, {card['n']} held-out problems, 0-shot chat prompts")
    levels = sorted({lv for m in card["models"].values() for lv in (m.get("by_level") or {})}, key=lambda x: (len(x), x))
    rows = []
    for tag, m in card["models"].items():
        lo, hi = m.get("ci95") or (None, None)
        rows.append([tag, m.get("stage"), m.get("pass@1"), f"[{_fmt(lo)}, {_fmt(hi)}]", m.get("format_rate"),
                     *[(m.get("by_level") or {}).get(lv, {}).get("pass@1") for lv in levels]])
    doc.table(["model", "stage", "pass@1", "95% CI (Wilson)", "\\boxed{} rate", *[f"level {lv}" for lv in levels]], rows)
    fl = card.get("floor")
    if fl and fl.get("answer") is not None:
        doc.p(f"Guessing floor: a model that always answers {fl['answer']} ({fl['what']}) scores {fl['pass@1']:.3f}; "
              "a pass@1 near it is the answer format plus the answer prior, not reasoning.")
    g = card.get("grpo")
    if g:
        doc.p(f"GRPO ({g['stage']}, {g['steps']} steps): mean reward {g['reward_first']:.3f} over the first three "
              f"steps, {g['reward_last']:.3f} over the last three (reward 1 only for the right answer in a closed "
              "\\boxed{}). Share of completions cut at the length limit per step: "
              + ", ".join(f"{t:.2f}" for t in g.get("truncated") or []) + ".")
        rp = g.get("replay")
        if rp:
            doc.p(f"The same prompts and sampling seeds as the first {rp['steps']} steps, answered by the final "
                  f"policy: mean reward {rp['final']:.3f} (against {rp['during']:.3f} during those steps). "
                  "This difference is what training changed; the first-vs-last one also holds how hard each "
                  "step's prompts happened to be.")
    doc.cmd(f"mobilellm-r1 eval --model {run_dir}/STAGE/final --task {card['task']} --style chat\n"
            f"cat {run_dir}/scorecard.json")
    for tag, path in sc.get("samples", {}).items():
        right, wrong = _examples(path)
        for kind, rows_ in (("correct", right), ("wrong", wrong)):
            for r in rows_:
                doc.quote(f"{tag}, {kind} (level {r.get('level')}, answer {r.get('gold')}): {r.get('problem', r['id'])}",
                          r.get("completion", ""))


def write_report(run_dir: str | Path, recipe: Recipe, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    run_dir = Path(run_dir)
    plots = run_dir / "report_plots"
    plots.mkdir(parents=True, exist_ok=True)
    rp = recipe.path or recipe.run.name
    doc = _Doc(run_dir)
    doc.h(1, f"MobileLLM-R1 run: {recipe.run.name}")
    doc.p(f"Recipe {rp}; run directory {run_dir}. {recipe.run.description}")
    doc.cmd(f"mobilellm-r1 run {rp} --out {run_dir}")

    if "evaluate" in manifests and manifests["evaluate"]["outputs"].get("scorecard"):
        _scorecard_section(doc, manifests["evaluate"]["outputs"]["scorecard"], rp, run_dir)

    # --- stages and timings
    doc.h(2, "Stages")
    doc.table(["stage", "kind", "seconds", "run id"],
              [[n, m.get("kind"), m.get("seconds"), m.get("run_id")] for n, m in manifests.items()])

    # --- loss curves
    doc.h(2, "Training loss per stage")
    train = {n: m for n, m in manifests.items() if m.get("kind") in ("train", "sft", "grpo")}
    curves = {n: read_metrics(m["outputs"].get("metrics", "")) for n, m in train.items()}
    doc.img(plot_losses(curves, plots / "losses.png"), "training and held-out loss per stage")
    doc.table(["stage", "steps", "final loss", "held-out before", "held-out after", "tokens/s"],
              [[n, m["outputs"].get("steps"), m["outputs"].get("final_loss"), m["outputs"].get("heldout_loss_initial"),
                m["outputs"].get("heldout_loss_final"), m["outputs"].get("tokens_per_s")] for n, m in train.items()])
    doc.cmd(f"mobilellm-r1 train --config {rp} --stage STAGE")

    # --- mixtures
    doc.h(2, "Source mixture weights")
    mixtures: dict[str, dict[str, float]] = {}
    if "mix" in manifests:
        srcs = list(manifests["mix"]["outputs"].get("weights", {}))
        mixtures["uniform"] = {s: 1.0 / len(srcs) for s in srcs} if srcs else {}
        mixtures["influence (Eq. 6)"] = manifests["mix"]["outputs"].get("weights", {})
    for n, m in train.items():
        if m["outputs"].get("mixture"):
            mixtures[n] = m["outputs"]["mixture"]
    doc.img(plot_mixtures(mixtures, plots / "mixtures.png"), "mixture weights per source")
    doc.cmd("mobilellm-r1 influence score ... && mobilellm-r1 mix --scores DIR --out mixture.toml")

    # --- LOO (Figure 6) and co-evolution (Figure 8)
    if "mix" in manifests and manifests["mix"]["outputs"].get("loo"):
        doc.h(2, "Leave-one-out ablations (Figure 6)")
        loo = manifests["mix"]["outputs"]["loo"]
        doc.img(plot_loo(loo.get("curves", {}), plots / "loo.png"), "normalised probe NLL over training, per left-out source")
        doc.table(["left out", *loo.get("capabilities", [])],
                  [[s, *[row.get(c) for c in loo.get("capabilities", [])]] for s, row in loo.get("delta", {}).items()])
        doc.cmd(f"mobilellm-r1 loo --recipe {rp} --out DIR")
    if "coevolve" in manifests:
        doc.h(2, "Mid-training data-model co-evolution (Figure 8)")
        co = manifests["coevolve"]["outputs"]
        doc.img(plot_histograms(co.get("histograms", []), plots / "coevolve.png"), "influence per co-evolution phase")
        doc.table(["phase", "samples", "positive share"],
                  [[i, ph.get("n"), ph.get("positive_share")] for i, ph in enumerate(co.get("phases", []), 1)])
        doc.cmd(f"mobilellm-r1 coevolve --recipe {rp} --out DIR")

    # --- evaluation (Tables 6-7 shape)
    if "evaluate" in manifests:
        ev = manifests["evaluate"]["outputs"]
        doc.h(2, "Evaluation")
        tasks = sorted({t for rows in ev["tasks"].values() for t in rows})
        rows = []
        for tag, res in ev["tasks"].items():
            cells = []
            for t in tasks:
                r = res.get(t, {})
                cells.append("skipped" if "skipped" in r else r.get("pass@1"))
            rows.append([f"{tag} ({ev['models'][tag]['stage']})", *cells])
        doc.table(["model", *tasks], rows)
        reasons = {t: r["skipped"] for res in ev["tasks"].values() for t, r in res.items() if "skipped" in r}
        for t, why in sorted(reasons.items()):
            doc.p(f"{t} skipped: {why}")
        fmt = ev.get("format") or {}
        ftasks = sorted({t for r in fmt.values() for t in r})
        if ftasks:
            doc.h(3, "Format following: share of 0-shot chat completions with a \\boxed{} answer")
            doc.table(["model", *ftasks], [[f"{tag} ({ev['models'][tag]['stage']})", *[r.get(t) for t in ftasks]]
                                           for tag, r in fmt.items()])
        doc.h(3, "Perplexity on held-out data and RankMe")
        doc.table(["model", "NLL", "ppl", "RankMe"],
                  [[tag, p["overall"].get("nll"), p["overall"].get("ppl"), p.get("rankme")]
                   for tag, p in ev["probe"].items()])
        doc.cmd(f"mobilellm-r1 eval --model {run_dir}/STAGE/final --task TASK\n"
                f"mobilellm-r1 probe --model {run_dir}/STAGE/final --shards {run_dir}/shards --json")

    # --- on-device (Table 10 shape)
    if "deploy" in manifests:
        d = manifests["deploy"]["outputs"]
        doc.h(2, "On-device: 8da4w quantization and decode throughput (Table 10)")
        acc, ex = d.get("accuracy") or {}, d.get("export") or {}
        doc.table(["perplexity fp32", "perplexity 8da4w", "ratio", ".pte MB", "size vs fp32"],
                  [[(acc.get("fp32") or {}).get("ppl"), (acc.get("8da4w") or {}).get("ppl"), acc.get("ppl_ratio"),
                    (ex.get("bytes") or 0) / 1e6 if ex.get("bytes") else None, ex.get("size_ratio")]])
        bench = d.get("bench") or {}
        if bench.get("runtimes"):
            for title, header, rows in grids(bench):
                doc.h(3, title)
                doc.table(header, rows)
        doc.cmd("mobilellm-r1 quantize CKPT --out DIR --json\n"
                "mobilellm-r1 export CKPT --format executorch --out model.pte\n"
                "mobilellm-r1 bench CKPT --contexts 256,512,1024 --json")

    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text(md_path, "\n".join(doc.md))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(recipe.run.name)} report</title>"
            f"<style>{CSS}</style></head><body>{''.join(doc.html)}</body></html>")
    write_text(html_path, page)
    return {"html": str(html_path), "md": str(md_path), "plots": sorted(str(p) for p in plots.glob("*.png"))}


