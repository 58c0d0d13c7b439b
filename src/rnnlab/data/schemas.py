"""pandera schemas for the tables passed between stages (the one place they are defined).

``validate(df, schema, what)`` runs a schema lazily and turns failures into one DataError that
names the source file and line of each bad row (tables carry ``file`` and ``line`` columns).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from rnnlab.errors import DataError

# Split names: the built-ins' (train/valid/test, Multi30k's val, Flickr8k's dev), a carve rule's
# (train/valid/test), extra evaluation sets (eval_<name>); "none": captions of no split (counted).
LM_SPLITS = r"^(train|valid|test|eval_[A-Za-z0-9_.-]+)$"
PARALLEL_SPLITS = r"^(train|val|valid|test|eval_[A-Za-z0-9_.-]+)$"
CAPTION_SPLITS = r"^(train|valid|val|dev|test|none|eval_[A-Za-z0-9_.-]+)$"

_common = {
    "file": pa.Column(str, nullable=False),
    "line": pa.Column(int, pa.Check.ge(1), nullable=False),
}


def _non_blank(series: pd.Series) -> pd.Series:
    return series.str.strip().str.len() > 0


LM_LINES = pa.DataFrameSchema(
    {
        "split": pa.Column(str, pa.Check.str_matches(LM_SPLITS)),
        **_common,
        # Blank lines are real in WikiText (paragraph breaks, scored as <eos>), so text may be empty.
        "text": pa.Column(str, nullable=False),
    },
    strict=True,
    name="lm_lines",
)

PARALLEL_PAIRS = pa.DataFrameSchema(
    {
        "split": pa.Column(str, pa.Check.str_matches(PARALLEL_SPLITS)),
        **_common,
        "src": pa.Column(str, pa.Check(_non_blank, error="source sentence is empty"), nullable=False),
        "tgt": pa.Column(str, pa.Check(_non_blank, error="target sentence is empty"), nullable=False),
    },
    strict=True,
    name="parallel_pairs",
)


def caption_schema(image_dir: Path | None, any_image_type: bool = False) -> pa.DataFrameSchema:
    """Captions; when ``image_dir`` is given every image must exist there. Flickr8k names end in
    ``.jpg`` with five captions each; a user's corpus (``any_image_type``) may differ."""
    image_checks = [] if any_image_type else [pa.Check.str_endswith(".jpg", error="image name must end in .jpg")]
    if image_dir is not None:
        image_checks.append(
            pa.Check(
                lambda s: s.map(lambda name: (image_dir / name).is_file()), error=f"image file missing in {image_dir}"
            )
        )
    return pa.DataFrameSchema(
        {
            "split": pa.Column(str, pa.Check.str_matches(CAPTION_SPLITS)),
            **_common,
            "image": pa.Column(str, image_checks),
            "caption_index": pa.Column(int, pa.Check.ge(0) if any_image_type else pa.Check.in_range(0, 4)),
            "caption": pa.Column(str, pa.Check(_non_blank, error="caption is empty"), nullable=False),
        },
        strict=True,
        name="captions",
    )


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, what: str, max_reported: int = 5) -> pd.DataFrame:
    """Validate ``df``; on failure raise DataError listing ``file line N: column: check`` per bad row."""
    try:
        return schema.validate(df, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
        lines = []
        for _, case in cases.head(max_reported).iterrows():
            idx = case.get("index")
            column = case.get("column")
            check = case.get("check")
            if idx is not None and not pd.isna(idx) and idx in df.index:
                row = df.loc[idx]
                where = f"{row.get('file', '?')} line {row.get('line', '?')}"
            else:
                where = "table"
            lines.append(f"{where}: column {column!r} failed {check!r} (value {case.get('failure_case')!r})")
        more = len(cases) - len(lines)
        suffix = f" (+{more} more)" if more > 0 else ""
        raise DataError(f"{what}: schema {schema.name} failed:\n  " + "\n  ".join(lines) + suffix) from None
