"""Quality filter (paper section 5.1.1, Figure 5, step 1): an educational-value score 0-5 with the
FineWeb-Edu classifier's interface; samples whose score is above the threshold (default > 4) pass.

Two scorers give the same output:

- :class:`FineWebEduScorer`: the real FineWeb-Edu classifier (a transformers sequence-classification model
  with one regression output) from a local directory. ``score`` is its raw float output; ``int_score`` is
  ``round(clamp(score, 0, 5))``, the integer FineWeb-Edu publishes. Which one is thresholded is the
  ``quality_use_int_score`` setting (default: the float).
- :class:`RidgeQualityHead`: the offline **stand-in**. FineWeb-Edu was built by having a large LLM rate
  pages 0-5 and fitting a regression head on an embedding model; the stand-in does the same at demo scale:
  the Ask-LLM scorer rates a seeded subset 0-5 (expected digit, ``askllm.EDU_PROMPT``), and a ridge
  regression on MiniLM embeddings learns those ratings. It is only as good as that small judge and a few
  dozen labels; its held-out fit (R^2, Pearson r) is reported so nobody mistakes it for the real classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


class FineWebEduScorer:
    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"quality classifier {p}: no config.json (expected a local copy of the "
                                    "FineWeb-Edu classifier or another 1-output sequence-classification model)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(p))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(p)).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"quality classifier {p}: expected 1 regression output, has {self.model.config.num_labels}")
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> list[dict]:
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s: s + self.batch_size]), padding="longest", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.squeeze(-1).float().cpu()
            for v in logits.tolist():
                out.append(edu_row(v))
        return out


def edu_row(score: float) -> dict:
    return {"score": float(score), "int_score": int(round(min(max(score, 0.0), 5.0)))}


@dataclass
class RidgeQualityHead:
    """``score = clamp(x @ w + b, 0, 5)`` on embeddings ``x``; fitted in closed form (float64)."""

    w: torch.Tensor
    b: float
    fit: dict

    @classmethod
    def train(cls, x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, heldout: float = 0.2, seed: int = 0
              ) -> "RidgeQualityHead":
        """Fit on all labels; ``fit`` reports R^2 and Pearson r of a model fitted without a seeded
        ``heldout`` share, measured on that share (the stand-in's honest quality)."""
        n = len(y)
        if n < 2:
            raise ValueError(f"the stand-in quality head needs at least 2 labelled samples, got {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(round(n * heldout))) if n >= 5 else 0
        fit: dict = {"labels": n, "label_mean": float(y.mean()), "label_std": float(y.std()) if n > 1 else 0.0}
        if n_test:
            test, train = perm[:n_test], perm[n_test:]
            w, b = _ridge(x[train], y[train], l2)
            pred = x[test].double() @ w + b
            yt = y[test].double()
            ss = float(((yt - yt.mean()) ** 2).sum())
            fit["heldout"] = n_test
            fit["heldout_r2"] = 1.0 - float(((yt - pred) ** 2).sum()) / ss if ss > 0 else float("nan")
            fit["heldout_pearson"] = float(torch.corrcoef(torch.stack([pred, yt]))[0, 1]) if n_test > 1 else float("nan")
        w, b = _ridge(x, y, l2)
        return cls(w=w, b=b, fit=fit)

    def score(self, x: torch.Tensor) -> list[dict]:
        pred = (x.double() @ self.w + self.b).clamp(0.0, 5.0)
        return [edu_row(v) for v in pred.tolist()]


def _ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    a = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ (y - my))
    return w, float(my - mx @ w)
